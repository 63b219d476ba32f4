# Seconds per GD step of the MFRes kernels, run by benchmarks/run.py as
#   julia -t T --project=. benchmarks/julia_bench.jl L M d N dtype steps repeats [memory]
# (memory: store, the default, or recompute). Standalone (run.py computes goal 2 itself,
# from NumPy's dgemm rate and julia_act_rate.jl), the machine limit of a step as
#   julia -t T --project=. benchmarks/julia_bench.jl limit L M d N steps repeats [GFLOPS]
# which prints the dgemm rate (Julia's BLAS on T threads, Float64; or GFLOPS if given, e.g.
# NumPy's rate, as run.py uses), the OpenBLAS kernel set of Julia's BLAS, the activation's
# per-element time (the kernels' tanh, value and derivative, on T threads), the limit
# 12·N·M·d·L / dgemm + N·M·L · t_act, the step's minimum and median and their ratio.
# Start Julia with OPENBLAS_CORETYPE as mfres does (SkylakeX or Haswell, see the README):
# otherwise an OpenBLAS older than the CPU takes slow kernels, the printed kernel set says
# so, and a measured dgemm rate and the limit are off (Julia 1.5.3's OpenBLAS took an Intel
# Xeon model 207 for a "Prescott": 18.7-21.7 GFLOP/s on 2 threads, 150.8 with SkylakeX).
# Prints one line: "median_seconds_per_step min_seconds_per_step loss_first loss_last
# rss_bytes kept_bytes": the resident memory after the timed steps above the baseline
# taken once the code is compiled (on a tiny problem) and the inputs exist, and the
# bytes of the arrays the kernels keep (θ and the workspace).
using LinearAlgebra
using Random
# MFRES_JL_DIR: another copy of jl/ (to compare two versions of the kernels)
include(joinpath(get(ENV, "MFRES_JL_DIR", joinpath(@__DIR__, "..", "jl")), "MFRes.jl"))

rss() = parse(Int, split(read("/proc/self/statm", String))[2]) * 4096

function compile_on_tiny_problem(T)
    U, W, X = ones(T, 2, 3, 2), ones(T, 2, 3, 2), ones(T, 2, 5)
    b, y, a = ones(T, 3, 2), ones(T, 5), ones(T, 2)
    ws = MFRes.Workspace(U, X)
    MFRes.gd!(ws, U, W, b, X, y, a, 0.1, 2, MFRes.activation(:tanh); losses = zeros(3))
    return nothing
end

function problem(T, L, M, d, N)
    rng = MersenneTwister(0)
    U = T.(randn(rng, d, M, L))
    W = T.(randn(rng, d, M, L))
    b = T.(randn(rng, M, L))
    X = randn(rng, d, N)
    X = T.(X ./ sqrt.(sum(abs2, X; dims = 1)))
    y = T.(sin.(2 .* vec(sum(X; dims = 1)) ./ sqrt(d)))
    a = T.(fill(1 / sqrt(d), d))
    return U, W, b, X, y, a
end

function main(args)
    args[1] == "limit" && return limit(args[2:end])
    BLAS.set_num_threads(Threads.nthreads())  # "T threads" means T for BLAS too
    L, M, d, N = (parse(Int, a) for a in args[1:4])
    T = args[5] == "float32" ? Float32 : Float64
    nsteps = parse(Int, args[6])
    repeats = parse(Int, args[7])
    memory = length(args) >= 8 ? Symbol(args[8]) : :store
    U, W, b, X, y, a = problem(T, L, M, d, N)
    compile_on_tiny_problem(T)
    GC.gc()
    base = rss()
    ws = MFRes.Workspace(U, X; memory = memory)
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

# Minimum over `reps` runs of f() (after one warm-up run): on a shared machine the
# fastest run is the one least disturbed by other processes.
function best_time(f, reps)
    f()
    t = Inf
    for _ in 1:reps
        t = min(t, @elapsed f())
    end
    return t
end

# GFLOP/s of a 2048² Float64 matrix product on `threads` BLAS threads.
function dgemm_rate(threads)
    BLAS.set_num_threads(threads)
    n = 2048
    A, B, C = randn(n, n), randn(n, n), zeros(n, n)
    t = best_time(() -> mul!(C, A, B), 5)
    BLAS.set_num_threads(1)
    return 2n^3 / t / 1e9
end

# Seconds per element of the kernels' activation (σ and σ′ of tanh, Float64), on all
# Julia threads, each on a 512 × 128 block in cache (the kernels' chunk).
function activation_time()
    nt = Threads.nthreads()
    Q = [randn(512, 128) for _ in 1:nt]
    S = [similar(q) for q in Q]
    σ = MFRes.activation(:tanh)
    function act!(s, q)
        @inbounds @simd for i in eachindex(q)
            v, dv = MFRes.value_and_derivative(σ, q[i])
            s[i] = v * dv
        end
    end
    run() = Threads.@threads for j in 1:nt
        for _ in 1:20
            act!(S[j], Q[j])
        end
    end
    return best_time(run, 30) / (20 * nt * length(Q[1]))
end

function limit(args)
    L, M, d, N = (parse(Int, a) for a in args[1:4])
    nsteps = parse(Int, args[5])
    repeats = parse(Int, args[6])
    nt = Threads.nthreads()
    given = length(args) >= 7
    gflops = given ? parse(Float64, args[7]) : dgemm_rate(nt)
    dgemm_from = given ? "given" : "julia"
    tact = activation_time()
    lim = 12 * N * M * d * L / (gflops * 1e9) + N * M * L * tact
    U, W, b, X, y, a = problem(Float64, L, M, d, N)
    ws = MFRes.Workspace(U, X)
    σ = MFRes.activation(:tanh)
    losses = zeros(nsteps + 1)
    times = Float64[]
    MFRes.gd!(ws, U, W, b, X, y, a, 0.1, 1, σ; losses = losses)
    for _ in 1:repeats
        t = @elapsed MFRes.gd!(ws, U, W, b, X, y, a, 0.1, nsteps - 1, σ; losses = losses)
        push!(times, t / nsteps)
    end
    sort!(times)
    println("threads=$nt L=$L M=$M d=$d N=$N dgemm_gflops=$(round(gflops, digits = 1)) dgemm_from=$dgemm_from blas=$(MFRes.blas_core()) ",
            "act_ns=$(round(tact * 1e9, digits = 3)) limit_ms=$(round(lim * 1e3, digits = 3)) ",
            "step_min_ms=$(round(times[1] * 1e3, digits = 3)) step_median_ms=$(round(times[(end + 1) ÷ 2] * 1e3, digits = 3)) ",
            "min_over_limit=$(round(times[1] / lim, digits = 2))")
end

main(ARGS)
