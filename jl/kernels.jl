# Forward pass, loss and discrete adjoint on a Workspace (docs/model.md, section 2, the discrete adjoint).
#
# Two paths compute the same numbers (to rounding: the CPU's tanh is its own, see activations.jl):
# - chunked (CPU `Array`s, `ws.threaded`): the samples are cut into fixed chunks
#   (`chunk_size`, from N, M and d only). The forward pass takes a chunk through all L
#   layers in one go (samples are independent), the adjoint does one layer at a time
#   over all chunks: each chunk's products (plain loops, products.jl) run while its
#   activations are in cache, and its parameter-gradient sums go to a per-chunk
#   buffer; the chunk sums are then added in chunk order (by particle blocks, in the
#   next layer's parallel region). No sum over samples is ever split differently, so
#   the results are bitwise the same on any number of threads, serial or not.
# - generic (any array type, e.g. CuArray): whole-layer `mul!` and broadcasting, one
#   evaluation of the activation per element.
# In `:recompute` memory mode both keep only the states Z and recompute a layer's
# S = σ(q), D = σ′(q) in the adjoint, with the same products on the same operands as
# the forward pass, hence the same numbers as `:store`.

"""
    blocks(n, k) -> Vector{UnitRange{Int}}

`1:n` cut into `k` contiguous, nearly equal ranges (fewer if `n < k`).
"""
function blocks(n::Integer, k::Integer)
    k = max(1, min(k, n))
    return [part(n, j, k) for j in 1:k]
end

# The j-th of k contiguous, nearly equal parts of 1:n (empty if j > n).
@inline part(n::Integer, j::Integer, k::Integer) = (div((j - 1) * n, k) + 1):div(j * n, k)

# Below this much work per layer (N·M·d), starting tasks costs more than it saves.
const PARALLEL_WORK = 1 << 16

# f(j, np) for j in 1:np, one task each, with np = min(threads, nitems) when the layer's
# work `work` is worth it; otherwise f(1, 1) on this thread. Each f splits its items
# by `part`, so what is computed never depends on np.
function in_parallel(f, ws::Workspace, nitems::Integer, work::Integer)
    np = min(Threads.nthreads(), nitems)
    if np <= 1 || work < PARALLEL_WORK
        f(1, 1)
    else
        ws.parallel_regions += 1
        Threads.@threads for j in 1:np
            f(j, np)
        end
    end
    return nothing
end

# S[:, i, ls] = σ(S[:, i, ls] + b[:, l]) (S holds W_lᵀ z on entry) and D = σ′ likewise,
# for the samples `cols` (the kernels call it on each group of samples as `mul_tall!`
# completes it, see `DONE_ELEMENTS`); D === nothing: the value only. The bias is added
# in a pass of its own, so that σ runs as one flat loop over the samples' contiguous
# block of S: LLVM interleaves a flat loop's iterations and hides the latency of σ's long
# dependency chain, which it does not do for a loop nested in the sample loop (measured
# 1.3-1.6x).
# (`ivdep`: S, D and b are distinct arrays, which lets the loops vectorise.)
function activate!(S::Array{T,3}, D::Array{T,3}, ls, b, l, σ::Activation, cols) where {T}
    @inbounds @simd ivdep for k in add_bias!(S, ls, b, l, cols)
        s, ds = value_and_derivative(σ, S[k], host_tanh)
        S[k] = s
        D[k] = ds
    end
    return nothing
end

function activate!(S::Array{T,3}, ::Nothing, ls, b, l, σ::Activation, cols) where {T}
    @inbounds @simd ivdep for k in add_bias!(S, ls, b, l, cols)
        S[k] = value_and_derivative(σ, S[k], host_tanh)[1]
    end
    return nothing
end

# S[:, cols, ls] .+= b[:, l]; returns the linear indices of that block of S.
function add_bias!(S::Array{T,3}, ls, b, l, cols) where {T}
    M = size(S, 1)
    ob = M * (l - 1)
    @inbounds for i in cols
        o = M * ((ls - 1) * size(S, 2) + i - 1)
        @simd ivdep for m in 1:M
            S[o + m] += b[ob + m]
        end
    end
    first_col = M * ((ls - 1) * size(S, 2) + first(cols) - 1)
    return (first_col + 1):(first_col + M * length(cols))
end

# The slot of layer l in S and D: its own in :store mode, the single one in :recompute
# (a Workspace or a BatchWorkspace).
@inline slot(ws, l) = ws.memory === :store ? l : 1

# Whether the forward pass keeps σ′ (only when stored and not a function of σ).
keeps_derivative(ws::Workspace, σ::Activation) = keeps_derivative(ws.memory, σ)
keeps_derivative(memory::Symbol, σ::Activation) = memory === :store && !derivative_from_value(σ)

"""
    forward!(ws, U, W, b, X, σ) -> z_L

Fill `ws.Z` (and, in `:store` mode, `ws.S` and, if needed, `ws.D`) for the net
θ = (U, W, b) on inputs `X`.
"""
function forward!(ws::Workspace{T}, U, W, b, X, σ::Activation) where {T}
    d, M, L = size(U)
    N = size(X, 2)
    ensure_derivative_buffers!(ws, σ)
    copyto!(view(ws.Z, :, :, 1), X)
    if ws.threaded
        serial_blas!()
        transpose_layers!(ws.Wt, W)  # for this step's forward pass and adjoint
        transpose_layers!(ws.Ut, U)
        nch = length(ws.chunks)
        in_parallel(ws, nch, N * M * d) do j, np
            for k in part(nch, j, np)
                forward_chunk!(ws, U, W, b, σ, ws.chunks[k])
            end
        end
    else
        forward_generic!(ws, U, W, b, σ)
    end
    return view(ws.Z, :, :, L + 1)
end

# One chunk of samples through all layers.
forward_chunk!(ws::Workspace, U, W, b, σ::Activation, cols) =
    forward_chunk!(ws, U, W, b, σ, cols, keeps_derivative(ws, σ) ? ws.D : nothing)

# (D: where σ′ goes, or nothing; a type of its own, so that the closure below is concrete.)
function forward_chunk!(ws::Workspace{T}, U, W, b, σ::Activation, cols, D) where {T}
    M, L = size(U, 2), size(U, 3)
    c = T(1 / (L * M))  # h/M
    i0 = first(cols) - 1
    for l in 1:L
        ls = slot(ws, l)
        Zl = view(ws.Z, :, cols, l)
        Sl = view(ws.S, :, cols, ls)
        mul_tall!(Sl, view(ws.Wt, :, :, l), Zl, (i1, i2) -> activate!(ws.S, D, ls, b, l, σ, (i0 + i1):(i0 + i2)))
        Zn = view(ws.Z, :, cols, l + 1)
        copyto!(Zn, Zl)
        mul_short!(Zn, view(ws.Ut, :, :, l), Sl, c, one(T))
    end
    return nothing
end

# S (and D where kept) of layer l into slot ls, from ws.Q = W_lᵀ z_l: one evaluation of
# σ per element (the pair buffer SD when σ′ is needed and not a function of σ).
function activate_generic!(ws::Workspace, σ::Activation, ls, b, l, with_derivative::Bool)
    Sl = view(ws.S, :, :, ls)
    bl = view(b, :, l)
    if with_derivative && !derivative_from_value(σ)
        ws.SD .= ValueAndDerivative(σ).(ws.Q .+ bl)
        Sl .= first.(ws.SD)
        view(ws.D, :, :, ls) .= last.(ws.SD)
    else
        Sl .= Value(σ).(ws.Q .+ bl)
    end
    return nothing
end

function forward_generic!(ws::Workspace{T}, U, W, b, σ::Activation) where {T}
    M, L = size(U, 2), size(U, 3)
    c = T(1 / (L * M))
    for l in 1:L
        ls = slot(ws, l)
        Zl = view(ws.Z, :, :, l)
        mul!(ws.Q, transpose(view(W, :, :, l)), Zl)
        activate_generic!(ws, σ, ls, b, l, ws.memory === :store)
        Zn = view(ws.Z, :, :, l + 1)
        copyto!(Zn, Zl)
        mul!(Zn, view(U, :, :, l), view(ws.S, :, :, ls), c, one(T))
    end
    return nothing
end

sumsq(x) = sum(abs2, x)

# (λ/2) (1/(L M)) Σ|θ|², in Float64.
function decay_term(U, W, b, weight_decay::Real)
    weight_decay == 0 && return 0.0
    M, L = size(U, 2), size(U, 3)
    sq = Float64(sumsq(U)) + Float64(sumsq(W)) + Float64(sumsq(b))
    return 0.5 * weight_decay * sq / (L * M)
end

"""
    loss_and_grad!(ws, U, W, b, X, y, a, σ; weight_decay=0.0) -> E

E(θ) (a `Float64`) and, into `ws.gU`, `ws.gW`, `ws.gb`, its gradient by the
discrete adjoint. Afterwards `ws.P` holds p_0 (N times the gradient of the data term
with respect to the inputs, per sample).
"""
function loss_and_grad!(ws::Workspace{T}, U, W, b, X, y, a, σ::Activation;
                        weight_decay::Real = 0.0) where {T}
    M, L = size(U, 2), size(U, 3)
    N = size(X, 2)
    zL = forward!(ws, U, W, b, X, σ)
    r = ws.r
    mul!(r, transpose(zL), a)
    r .-= y
    E = 0.5 * Float64(sumsq(r)) / N + decay_term(U, W, b, weight_decay)
    mul!(ws.P, a, transpose(r))  # p_L = r a, one column per sample
    if ws.threaded
        adjoint_chunked!(ws, U, W, b, σ)
    else
        adjoint_generic!(ws, U, W, b, σ)
    end
    if weight_decay != 0
        wd = T(weight_decay / (L * M))
        ws.gU .+= wd .* U
        ws.gW .+= wd .* W
        ws.gb .+= wd .* b
    end
    return E
end

function adjoint_chunked!(ws::Workspace{T}, U, W, b, σ::Activation) where {T}
    d, M, L = size(U)
    N = size(ws.Z, 2)
    c = T(1 / (L * M))
    cg = T(1 / (L * M) / N)
    nch = length(ws.chunks)
    work = N * M * d
    for l in L:-1:1
        # task j: layer l+1's gradient for its particles (chunk sums of the last
        # region), then its chunks of layer l (the partial buffers alternate by layer)
        in_parallel(ws, nch, work) do j, np
            l < L && reduce_chunks!(ws, l + 1, cg, part(M, j, np))
            for k in part(nch, j, np)
                adjoint_chunk!(ws, U, W, b, σ, l, k, j, l == L ? zero(T) : c)
            end
        end
    end
    in_parallel(ws, nch, work) do j, np
        reduce_chunks!(ws, 1, cg, part(M, j, np))
        for k in part(nch, j, np)  # p_0 = p_1 + (h/M) Σ W σ′ (U·p_1)
            cols = ws.chunks[k]
            view(ws.P, :, cols) .+= c .* view(ws.Pn, :, cols)
        end
    end
    return nothing
end

@inline buffer_of(l) = (l & 1) + 1

# Layer l on chunk k, in task j: P = p_{l+1} (from the previous layer's Pn), T = σ′(q)
# (U·p_{l+1}), Pn = W T, and the chunk's sums Σ_i p sᵀ, Σ_i z Tᵀ, Σ_i T. T goes to task
# j's own chunk-sized block of Tm, which stays in cache from one chunk to the next; the
# sum Σ_i p sᵀ runs first, so that the layer's stored S, which it reads from memory, is
# still in cache when σ′ is taken from it (activations with σ′ a function of σ), as
# `mul_tall!` completes each group of T's columns.
function adjoint_chunk!(ws::Workspace{T}, U, W, b, σ::Activation, l, k, j, cprev) where {T}
    cols = ws.chunks[k]
    pb = buffer_of(l)
    P = view(ws.P, :, cols)
    if cprev != 0  # p_{l+1} = p_{l+2} + (h/M) Σ W σ′ (U·p_{l+2})
        P .+= cprev .* view(ws.Pn, :, cols)
    end
    Zl = view(ws.Z, :, cols, l)
    ls = slot(ws, l)
    i0 = first(cols) - 1
    if ws.memory === :recompute  # the forward pass's product and activation, again
        Wl = view(ws.Wt, :, :, l)
        if derivative_from_value(σ)
            mul_tall!(view(ws.S, :, cols, 1), Wl, Zl, (i1, i2) -> activate!(ws.S, nothing, 1, b, l, σ, (i0 + i1):(i0 + i2)))
        else
            mul_tall!(view(ws.S, :, cols, 1), Wl, Zl, (i1, i2) -> activate!(ws.S, ws.D, 1, b, l, σ, (i0 + i1):(i0 + i2)))
        end
    end
    Sl = view(ws.S, :, cols, ls)
    C = length(ws.chunks[1])
    C * j <= size(ws.Tm, 2) || error("task $j has no block of Tm (the thread count changed since the Workspace was made)")
    tcols = (C * (j - 1) + 1):(C * (j - 1) + length(cols))
    Tm = view(ws.Tm, :, tcols)
    mul_outer!(view(ws.gUp, :, :, k, pb), Sl, P)  # (Σ_i p sᵀ)ᵀ, see Workspace
    zero_sums!(ws.gbp, k, pb)
    t0 = first(tcols) - 1
    if derivative_from_value(σ)
        mul_tall!(Tm, view(ws.Ut, :, :, l), P,
                  (i1, i2) -> scale_and_sum!(ws.Tm, (t0 + i1):(t0 + i2), ws.S, ls, ws.gbp, k, pb, σ, (i0 + i1):(i0 + i2)))
    else
        mul_tall!(Tm, view(ws.Ut, :, :, l), P,
                  (i1, i2) -> scale_and_sum!(ws.Tm, (t0 + i1):(t0 + i2), ws.D, ls, ws.gbp, k, pb, nothing, (i0 + i1):(i0 + i2)))
    end
    mul_short!(view(ws.Pn, :, cols), view(ws.Wt, :, :, l), Tm, one(T), zero(T))
    mul_outer!(view(ws.gWp, :, :, k, pb), Tm, Zl)
    return nothing
end

# g[:, k, pb] = 0, for the row sums of `scale_and_sum!`.
function zero_sums!(g::Array{T,3}, k, pb) where {T}
    M = size(g, 1)
    og = M * ((pb - 1) * size(g, 2) + k - 1)
    @inbounds for m in 1:M
        g[og + m] = zero(T)
    end
    return nothing
end

# Tm[:, tcols] .*= σ′ of the samples `cols` (σ′ = D, or from S = σ) and g[:, k, pb] += its
# row sums, sample after sample. (Linear indices and `ivdep`: distinct arrays, so that the
# loops vectorise.)
function scale_and_sum!(Tm::Matrix{T}, tcols, D::Array{T,3}, ls, g, k, pb, ::Nothing, cols) where {T}
    M = size(Tm, 1)
    og = M * ((pb - 1) * size(g, 2) + k - 1)
    @inbounds for (it, i) in zip(tcols, cols)
        o = M * (it - 1)
        od = M * ((ls - 1) * size(D, 2) + i - 1)
        @simd ivdep for m in 1:M
            t = Tm[o + m] * D[od + m]
            Tm[o + m] = t
            g[og + m] += t
        end
    end
    return nothing
end

function scale_and_sum!(Tm::Matrix{T}, tcols, S::Array{T,3}, ls, g, k, pb, σ::Activation, cols) where {T}
    M = size(Tm, 1)
    og = M * ((pb - 1) * size(g, 2) + k - 1)
    @inbounds for (it, i) in zip(tcols, cols)
        o = M * (it - 1)
        os = M * ((ls - 1) * size(S, 2) + i - 1)
        @simd ivdep for m in 1:M
            t = Tm[o + m] * derivative_of_value(σ, S[os + m])
            Tm[o + m] = t
            g[og + m] += t
        end
    end
    return nothing
end

# gU, gW, gb of layer l for the particles `rows`: cg times the chunk sums (gUp, gWp
# transposed), in chunk order.
function reduce_chunks!(ws::Workspace{T}, l, cg, rows) where {T}
    isempty(rows) && return nothing
    d = size(ws.gU, 1)
    pb = buffer_of(l)
    gU, gW, gb, gUp, gWp, gbp = ws.gU, ws.gW, ws.gb, ws.gUp, ws.gWp, ws.gbp
    @inbounds for m in rows
        @simd for j in 1:d
            gU[j, m, l] = gUp[m, j, 1, pb]
            gW[j, m, l] = gWp[m, j, 1, pb]
        end
        gb[m, l] = gbp[m, 1, pb]
    end
    for k in 2:length(ws.chunks)
        @inbounds for m in rows
            @simd for j in 1:d
                gU[j, m, l] += gUp[m, j, k, pb]
                gW[j, m, l] += gWp[m, j, k, pb]
            end
            gb[m, l] += gbp[m, k, pb]
        end
    end
    @inbounds for m in rows
        @simd for j in 1:d
            gU[j, m, l] *= cg
            gW[j, m, l] *= cg
        end
        gb[m, l] *= cg
    end
    return nothing
end

function adjoint_generic!(ws::Workspace{T}, U, W, b, σ::Activation) where {T}
    M, L = size(U, 2), size(U, 3)
    N = size(ws.Z, 2)
    c = T(1 / (L * M))
    cg = T(1 / (L * M) / N)
    Tm = ws.Tm
    for l in L:-1:1
        ls = slot(ws, l)
        Zl = view(ws.Z, :, :, l)
        if ws.memory === :recompute
            mul!(ws.Q, transpose(view(W, :, :, l)), Zl)
            activate_generic!(ws, σ, 1, b, l, true)
        end
        Sl = view(ws.S, :, :, ls)
        mul!(Tm, transpose(view(U, :, :, l)), ws.P)
        if derivative_from_value(σ)
            Tm .*= DerivativeOfValue(σ).(Sl)
        else
            Tm .*= view(ws.D, :, :, ls)
        end
        mul!(view(ws.gU, :, :, l), ws.P, transpose(Sl), cg, zero(T))
        mul!(view(ws.gW, :, :, l), Zl, transpose(Tm), cg, zero(T))
        sum!(view(ws.gb, :, l:l), Tm)
        view(ws.gb, :, l) .*= cg
        mul!(ws.Pn, view(W, :, :, l), Tm)
        ws.P .+= c .* ws.Pn
    end
    return nothing
end

"""
    loss_and_grad(U, W, b, X, y, a; activation=:tanh, eta=0.5, weight_decay=0.0, memory=:store)
        -> (E, gU, gW, gb)

E(θ) and ∇E for the net θ = (U, W, b) (layouts in the module docstring).
"""
function loss_and_grad(U, W, b, X, y, a; activation::Symbol = :tanh, eta::Real = 0.5,
                       weight_decay::Real = 0.0, memory::Symbol = :store)
    ws = Workspace(U, X; memory = memory)
    E = loss_and_grad!(ws, U, W, b, X, y, a, MFRes.activation(activation; eta = eta);
                       weight_decay = weight_decay)
    return E, copy(ws.gU), copy(ws.gW), copy(ws.gb)
end

"""
    loss(U, W, b, X, y, a; activation=:tanh, eta=0.5, weight_decay=0.0) -> E

E(θ) alone (one forward pass).
"""
function loss(U, W, b, X, y, a; activation::Symbol = :tanh, eta::Real = 0.5, weight_decay::Real = 0.0)
    ws = Workspace(U, X; memory = :recompute)
    zL = forward!(ws, U, W, b, X, MFRes.activation(activation; eta = eta))
    r = transpose(zL) * a .- y
    return 0.5 * Float64(sumsq(r)) / size(X, 2) + decay_term(U, W, b, weight_decay)
end
