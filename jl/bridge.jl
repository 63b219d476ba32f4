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
`norms[1:k, j]`. The nets run one after the other on one cached workspace, except for
CPU `Array`s below the kernels' parallel threshold (N·M·d < `PARALLEL_WORK`, where one
net's kernels run on one thread) without `stop_nonfinite`, when there are several
threads or at least `LANES` nets: see `advance_small_nets!`. With
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
    if !stop_nonfinite && Us[1] isa Array && d * M * size(X, 2) < PARALLEL_WORK && (np > 1 || B >= LANES)
        advance_small_nets!(Us, Ws, bs, Symbol(memory), problem, out)
        return nsteps + 1
    end
    k = nsteps + 1
    for j in 1:B
        k = advance_net!(cached_workspace(Us[j], X, memory), (Us[j], Ws[j], bs[j]), j, problem, out,
                         stop_nonfinite, start)
    end
    return k
end

const BLOCK_CACHE = Ref{Any}(nothing)

# `n` lane blocks kept in BLOCK_CACHE while they fit, else n new ones
function cached_blocks(n, ::Type{T}, d, M, L, N, memory, derivative) where {T}
    wss = BLOCK_CACHE[]
    if !(wss isa Vector && length(wss) >= n && all(ws -> batch_fits(ws, T, d, M, L, N, memory, derivative), wss))
        wss = [BatchWorkspace{T,LANES}(d, M, L, N; memory = memory, derivative = derivative) for _ in 1:n]
        BLOCK_CACHE[] = wss
    end
    return wss
end

"""
    advance_small_nets!(Us, Ws, bs, memory, problem, out)

A batch of small nets (CPU `Array`s, N·M·d < `PARALLEL_WORK`): the first `LANES·⌊B/LANES⌋`
nets in lane blocks of `LANES` (batch.jl, vectorised across the nets), the rest one by
one on the chunked kernels; the blocks and single nets are taken by the threads as they
come free, each thread with its own workspaces. A net's numbers depend neither on the
thread count nor on the order the threads take the work; a net in a block agrees with its
run alone to rounding.
"""
function advance_small_nets!(Us, Ws, bs, memory::Symbol, p, out)
    B = length(Us)
    d, M, L = size(Us[1])
    N = size(p.X, 2)
    T = eltype(Us[1])
    nblk = B ÷ LANES
    items = nblk + (B - nblk * LANES)
    np = min(Threads.nthreads(), items)
    blocks = nblk > 0 ? cached_blocks(np, T, d, M, L, N, memory, !derivative_from_value(p.σ)) : nothing
    singles = B > nblk * LANES ? cached_workspaces(BATCH_CACHE, np, Us[1], p.X, String(memory)) : nothing
    next = Threads.Atomic{Int}(1)
    serial_blas!()
    IN_BATCH[] = true
    try
        Threads.@threads for t in 1:np
            while true
                q = Threads.atomic_add!(next, 1)  # the counter's value before the addition
                q > items && break
                if q <= nblk
                    advance_block!(blocks[t], Us, Ws, bs, ((q - 1) * LANES + 1):(q * LANES), p, out)
                else
                    j = nblk * LANES + q - nblk
                    advance_net!(singles[t], (Us[j], Ws[j], bs[j]), j, p, out, false, nothing)
                end
            end
        end
    finally
        IN_BATCH[] = false
    end
    return nothing
end

# the nets `js` (one per lane) of a batch by p.nsteps steps on lane block ws
function advance_block!(ws::BatchWorkspace, Us, Ws, bs, js, p, out)
    for (r, j) in enumerate(js)
        load_lane!(ws, r, Us[j], Ws[j], bs[j])
    end
    batch_gd!(ws, p.X, p.y, p.a, p.Δs, p.nsteps, p.σ; weight_decay = p.weight_decay, losses = out.losses,
              norms = out.norms, columns = js)
    for (r, j) in enumerate(js)
        store_lane!(Us[j], Ws[j], bs[j], ws, r)
        out.predictions === nothing || lane_predictions!(view(out.predictions, :, j), ws, r)
    end
    return nothing
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
