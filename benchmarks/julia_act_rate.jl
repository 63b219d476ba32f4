# Seconds per element of the Julia kernels' own activation with its derivative (tanh, float64),
# on all threads, run by benchmarks/run.py as
#   julia -t T benchmarks/julia_act_rate.jl n
# Prints one number: the median over repeats of the time of one pass over n elements, divided by n.
include(joinpath(@__DIR__, "..", "jl", "MFRes.jl"))

function pass!(σ, s, ds, q)
    chunks = Threads.nthreads()
    n = length(q)
    Threads.@threads for c in 1:chunks
        lo = div((c - 1) * n, chunks) + 1
        hi = div(c * n, chunks)
        @inbounds for i in lo:hi
            s[i], ds[i] = MFRes.value_and_derivative(σ, q[i])
        end
    end
    return nothing
end

function main(args)
    n = parse(Int, args[1])
    q = 3 .* randn(n)
    s, ds = similar(q), similar(q)
    σ = MFRes.activation(:tanh)
    pass!(σ, s, ds, q)
    times = Float64[]
    for _ in 1:15
        push!(times, @elapsed pass!(σ, s, ds, q))
    end
    sort!(times)
    println(times[(length(times) + 1) ÷ 2] / n)
end

main(ARGS)
