# Seconds per GD step of the MFRes kernels, run by benchmarks/run.py as
#   julia -t T --project=. benchmarks/julia_bench.jl L M d N dtype steps repeats
# Prints one line: "median_seconds_per_step min_seconds_per_step loss_first loss_last".
using LinearAlgebra
using Random
include(joinpath(@__DIR__, "..", "jl", "MFRes.jl"))

function main(args)
    BLAS.set_num_threads(Threads.nthreads())  # "T threads" means T for BLAS too
    L, M, d, N = (parse(Int, a) for a in args[1:4])
    T = args[5] == "float32" ? Float32 : Float64
    nsteps = parse(Int, args[6])
    repeats = parse(Int, args[7])
    rng = MersenneTwister(0)
    U = T.(randn(rng, d, M, L))
    W = T.(randn(rng, d, M, L))
    b = T.(randn(rng, M, L))
    X = randn(rng, d, N)
    X = T.(X ./ sqrt.(sum(abs2, X; dims = 1)))
    y = T.(sin.(2 .* vec(sum(X; dims = 1)) ./ sqrt(d)))
    a = T.(fill(1 / sqrt(d), d))
    ws = MFRes.Workspace(U, X)
    σ = MFRes.activation(:tanh)
    losses = zeros(nsteps + 1)
    MFRes.gd!(ws, U, W, b, X, y, a, 0.1, 1, σ; losses = losses)  # compile
    times = Float64[]
    for _ in 1:repeats
        t = @elapsed MFRes.gd!(ws, U, W, b, X, y, a, 0.1, nsteps, σ; losses = losses)
        push!(times, t / (nsteps + 1))
    end
    sort!(times)
    println(times[(length(times) + 1) ÷ 2], " ", times[1], " ", losses[1], " ", losses[end])
end

main(ARGS)
