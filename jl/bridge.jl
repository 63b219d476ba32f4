# What the Python bridges call: juliacall (pyfront/mfres/backends/julia_backend.py)
# and the executable transport's server (jl/server.jl). Names carry no `!` (Python
# cannot spell it) and the activation comes as a string.

"""
    host_array(x) -> Array

A Julia `Array` copy of `x` (a NumPy array seen from Julia, or a GPU array).
"""
host_array(x) = Array(x)

"""
    to_device(x, device::AbstractString) -> array

`x` itself for `"cpu"`; a `CuArray` for `"cuda"` once the CUDA glue is loaded.
"""
to_device(x, device::AbstractString) = device == "cpu" ? x : to_device(x, Val(Symbol(device)))
to_device(x, ::Val{D}) where {D} = throw(ArgumentError("device $D is not loaded; call MFRes.use_cuda!() after `using CUDA`"))

const WORKSPACE_CACHE = Ref{Any}(nothing)
const BATCH_CACHE = Ref{Any}(nothing)

# `n` workspaces kept in `cache` while their sizes and memory mode fit, else n new ones
function cached_workspaces(cache::Ref{Any}, n::Integer, U, X, memory::AbstractString)
    mode = Symbol(memory)
    wss = cache[]
    if !(wss isa Vector && length(wss) >= n && all(ws -> fits(ws, U, X, mode), wss))
        wss = [Workspace(U, X; memory = mode) for _ in 1:n]
        cache[] = wss
    end
    return wss
end

"""
    cached_workspace(U, X, memory = "store") -> Workspace

One workspace reused across calls, rebuilt when the size or the memory mode
(`"store"` or `"recompute"`, see `Workspace`) changes.
"""
cached_workspace(U, X, memory::AbstractString = "store") = cached_workspaces(WORKSPACE_CACHE, 1, U, X, memory)[1]

"""
    advance_chunk(U, W, b, X, y, a, Δs, nsteps, activation, eta, weight_decay; memory = "store") -> (losses, norms)

`gd!` on a cached workspace, with the RMS particle velocities, stopping at the first
non-finite E (the vectors are then shorter than `nsteps + 1`). Mutates U, W, b.
"""
function advance_chunk(U, W, b, X, y, a, Δs::Real, nsteps::Integer, activation::AbstractString,
                       eta::Real, weight_decay::Real; memory::AbstractString = "store")
    ws = cached_workspace(U, X, memory)
    losses = Vector{Float64}(undef, nsteps + 1)
    norms = Vector{Float64}(undef, nsteps + 1)
    k = gd!(ws, U, W, b, X, y, a, Δs, nsteps, MFRes.activation(Symbol(activation); eta = eta);
            weight_decay = weight_decay, losses = losses, norms = norms, stop_nonfinite = true)
    return losses[1:k], norms[1:k]
end

"""
    advance_nets(Us, Ws, bs, X, y, a, Δs, nsteps, activation, eta, weight_decay, losses, norms;
                 stop_nonfinite = false, memory = "store", predictions = nothing, start = nothing) -> k

A batch of nets on the same data: net `j` (θ = `Us[j], Ws[j], bs[j]`, mutated in place)
advances by `nsteps` GD steps, writing its E and RMS velocities into `losses[1:k, j]`,
`norms[1:k, j]`. The nets run one after the other on one cached workspace, or spread
over the threads, one workspace each, when there are several threads and nets, the nets
are CPU `Array`s below the kernels' parallel threshold (N·M·d < `PARALLEL_WORK`: each
net's kernels run on one thread) and `stop_nonfinite` is false; a net's numbers are the
same either way. With
`stop_nonfinite` (meant for one net) a net stops at its first non-finite E and `k` is
the number of values written for the last net; otherwise `k = nsteps + 1`.
`predictions` (an `N × B` matrix, or `nothing`) receives each net's output a·z_L(x_i)
at its last state, from the forward pass that gave its last E. `start = (E, v)` (one
net only): the cached workspace holds ∇E at this θ, from the end of the previous call
(see `gd!`).
"""
function advance_nets(Us, Ws, bs, X, y, a, Δs::Real, nsteps::Integer, activation::AbstractString, eta::Real,
                      weight_decay::Real, losses::AbstractMatrix{Float64}, norms::AbstractMatrix{Float64};
                      stop_nonfinite::Bool = false, memory::AbstractString = "store",
                      predictions::Union{Nothing,AbstractMatrix} = nothing,
                      start::Union{Nothing,Tuple{Float64,Float64}} = nothing)
    σ = MFRes.activation(Symbol(activation); eta = eta)
    start === nothing || length(Us) == 1 || throw(ArgumentError("start is for one net"))
    B = length(Us)
    B == 0 && return nsteps + 1
    d, M, _ = size(Us[1])
    np = min(Threads.nthreads(), B)
    problem = (X = X, y = y, a = a, Δs = Δs, nsteps = nsteps, σ = σ, weight_decay = weight_decay)
    out = (losses = losses, norms = norms, predictions = predictions)
    if np > 1 && !stop_nonfinite && Us[1] isa Array && d * M * size(X, 2) < PARALLEL_WORK
        # nets this small run their kernels on one thread: spread the nets over the threads
        # instead, each thread with its own workspace (a net's numbers stay those of a serial run)
        cache = cached_workspaces(BATCH_CACHE, np, Us[1], X, memory)
        serial_blas!()
        IN_BATCH[] = true
        try
            Threads.@threads for t in 1:np
                for j in t:np:B
                    advance_net!(cache[t], (Us[j], Ws[j], bs[j]), j, problem, out, false, nothing)
                end
            end
        finally
            IN_BATCH[] = false
        end
        return nsteps + 1
    end
    k = nsteps + 1
    for j in 1:B
        k = advance_net!(cached_workspace(Us[j], X, memory), (Us[j], Ws[j], bs[j]), j, problem, out,
                         stop_nonfinite, start)
    end
    return k
end

# net j of a batch (θ = (U, W, b)) by p.nsteps steps, into column j of the outputs `out`
function advance_net!(ws, θ, j, p, out, stop_nonfinite, start)
    k = gd!(ws, θ..., p.X, p.y, p.a, p.Δs, p.nsteps, p.σ; weight_decay = p.weight_decay,
            losses = view(out.losses, :, j), norms = view(out.norms, :, j), stop_nonfinite = stop_nonfinite,
            start = start)
    if out.predictions !== nothing
        zL = view(ws.Z, :, :, size(ws.Z, 3))
        copyto!(view(out.predictions, :, j), host_array(transpose(zL) * p.a))
    end
    return k
end

"""
    gradient(U, W, b, X, y, a, activation, eta, weight_decay; memory = "store") -> (E, gU, gW, gb)
"""
function gradient(U, W, b, X, y, a, activation::AbstractString, eta::Real, weight_decay::Real;
                  memory::AbstractString = "store")
    ws = cached_workspace(U, X, memory)
    E = loss_and_grad!(ws, U, W, b, X, y, a, MFRes.activation(Symbol(activation); eta = eta);
                       weight_decay = weight_decay)
    return E, copy(ws.gU), copy(ws.gW), copy(ws.gb)
end
