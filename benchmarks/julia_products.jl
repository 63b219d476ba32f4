# The chunked kernels' products (jl/products.jl) against single-threaded BLAS `mul!` on
# the same operands, at the chunk shapes of the benchmark sizes:
#   julia --project=. benchmarks/julia_products.jl
# MFRES_JL_DIR: another copy of jl/ (absolute path), to compare two versions of the loops.
# Prints, per shape (M, d, C) and product, microseconds per call (the best of 5 timed
# loops) for BLAS and for the loops (the z += c U s line includes resetting z), their
# ratio, and the largest difference of the results (rounding only).
using LinearAlgebra
using Random
include(joinpath(get(ENV, "MFRES_JL_DIR", joinpath(@__DIR__, "..", "jl")), "MFRes.jl"))

function best_time(f, n)
    f()
    t = Inf
    for _ in 1:5
        t = min(t, @elapsed(for _ in 1:n
            f()
        end))
    end
    return t / n
end

function compare(name, blas, own, out_blas, out_own, n)
    tb, to = best_time(blas, n), best_time(own, n)
    blas()
    own()
    err = maximum(abs.(out_blas .- out_own))
    println(rpad(name, 18), lpad(round(tb * 1e6; digits = 2), 9), lpad(round(to * 1e6; digits = 2), 9),
            lpad(round(tb / to; digits = 2), 7), "   ", err)
end

function main()
    BLAS.set_num_threads(1)
    rng = MersenneTwister(0)
    # (L, M, d, N) of the benchmark sizes small, default, medium, large; C is their chunk
    for (_, M, d, N) in ((8, 16, 4, 32), (16, 64, 4, 64), (32, 128, 8, 256), (64, 512, 16, 1024))
        C = MFRes.chunk_size(N, M, d)
        W = randn(rng, d, M)
        Wt = Matrix(transpose(W))
        Z, P = randn(rng, d, C), randn(rng, d, C)
        S, S2 = zeros(M, C), zeros(M, C)
        Y0, Yb, Yo = randn(rng, d, C), zeros(d, C), zeros(d, C)
        X = randn(rng, M, C)
        G, G2 = zeros(M, d), zeros(M, d)
        n = max(10, 20_000_000 ÷ (M * d * C))
        println("(M, d, C) = ", (M, d, C), ":  us BLAS, us loops, BLAS/loops, max |difference|")
        compare("  S = Wᵀ z", () -> mul!(S, transpose(W), Z), () -> MFRes.mul_tall!(S2, Wt, Z), S, S2, n)
        compare("  z += c U s", () -> (copyto!(Yb, Y0); mul!(Yb, W, X, 0.1, 1.0)),
                () -> (copyto!(Yo, Y0); MFRes.mul_short!(Yo, Wt, X, 0.1, 1.0)), Yb, Yo, n)
        compare("  G = s pᵀ", () -> mul!(G, X, transpose(P)), () -> MFRes.mul_outer!(G2, X, P), G, G2, n)
    end
end

main()
