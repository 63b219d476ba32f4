# Seconds per GD step of the MFRes kernels, run by benchmarks/run.py as
#   julia -t T --project=. benchmarks/julia_bench.jl L M d N dtype steps repeats
# Prints one line: "median_seconds_per_step min_seconds_per_step loss_first loss_last
# rss_bytes kept_bytes": the resident memory after the timed steps above the baseline
# taken once the code is compiled (on a tiny problem) and the inputs exist, and the
# bytes of the arrays the kernels keep (θ and the workspace).
using LinearAlgebra
using Random
include(joinpath(@__DIR__, "..", "jl", "MFRes.jl"))

rss() = parse(Int, split(read("/proc/self/statm", String))[2]) * 4096

function compile_on_tiny_problem(T)
    U, W, X = ones(T, 2, 3, 2), ones(T, 2, 3, 2), ones(T, 2, 5)
    b, y, a = ones(T, 3, 2), ones(T, 5), ones(T, 2)
    ws = MFRes.Workspace(U, X)
    MFRes.gd!(ws, U, W, b, X, y, a, 0.1, 2, MFRes.activation(:tanh); losses = zeros(3))
    return nothing
end

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
    compile_on_tiny_problem(T)
    GC.gc()
    base = rss()
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
    kept = sum(sizeof(getfield(ws, f)) for f in fieldnames(typeof(ws)) if getfield(ws, f) isa AbstractArray)
    kept += sizeof(U) + sizeof(W) + sizeof(b)
    println(times[(length(times) + 1) ÷ 2], " ", times[1], " ", losses[1], " ", losses[end], " ",
            rss() - base, " ", kept)
end

main(ARGS)
