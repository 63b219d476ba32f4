# Forward pass, loss and discrete adjoint on a Workspace (docs/model.md, section 2, the discrete adjoint).
#
# Two paths compute the same numbers:
# - threaded (CPU `Array`s): each layer is split into blocks of samples (forward,
#   adjoint) or of particles (parameter gradients), one task per block, each block
#   doing its own matrix products (single-threaded BLAS) and its element-wise work
#   while the data is in cache. A sum over samples is never split across tasks, so
#   the results do not depend on the number of threads.
# - generic (any array type, e.g. CuArray): whole-layer `mul!` and broadcasting.

"""
    blocks(n, k) -> Vector{UnitRange{Int}}

`1:n` cut into `k` contiguous, nearly equal ranges (fewer if `n < k`).
"""
function blocks(n::Integer, k::Integer)
    k = max(1, min(k, n))
    edges = [div((j - 1) * n, k) for j in 1:k+1]
    return [edges[j]+1:edges[j+1] for j in 1:k]
end

# Below this much work per layer (N·M·d), starting tasks costs more than it saves.
const PARALLEL_WORK = 1 << 16

# Run f(range) for each block of 1:n, in parallel when there are several threads and
# the layer's work `work` is worth it.
function foreach_block(f, n::Integer, work::Integer)
    nt = Threads.nthreads()
    if nt == 1 || work < PARALLEL_WORK
        f(1:n)
    else
        parts = blocks(n, nt)
        Threads.@threads for j in eachindex(parts)
            f(parts[j])
        end
    end
    return nothing
end

# S, D = σ(Q + b), σ′(Q + b) on the columns `cols`.
function activate_block!(S, D, Q, b, σ::Activation, cols)
    @inbounds for i in cols
        @simd for m in axes(Q, 1)
            s, ds = value_and_derivative(σ, Q[m, i] + b[m])
            S[m, i] = s
            D[m, i] = ds
        end
    end
    return nothing
end

"""
    forward!(ws, U, W, b, X, σ) -> z_L

Fill `ws.Z`, `ws.S`, `ws.D` for the net θ = (U, W, b) on inputs `X`.
"""
function forward!(ws::Workspace{T}, U, W, b, X, σ::Activation) where {T}
    M, L = size(U, 2), size(U, 3)
    c = T(1 / (L * M))  # h/M
    Z = ws.Z
    copyto!(view(Z, :, :, 1), X)
    for l in 1:L
        if ws.threaded
            foreach_block(size(X, 2), length(ws.Q) * size(U, 1)) do cols
                forward_block!(ws, U, W, b, σ, c, l, cols)
            end
        else
            Zl = view(Z, :, :, l)
            Sl = view(ws.S, :, :, l)
            Dl = view(ws.D, :, :, l)
            mul!(ws.Q, transpose(view(W, :, :, l)), Zl)
            ws.Q .+= view(b, :, l)
            Sl .= Value(σ).(ws.Q)
            Dl .= Derivative(σ).(ws.Q)
            Zn = view(Z, :, :, l + 1)
            copyto!(Zn, Zl)
            mul!(Zn, view(U, :, :, l), Sl, c, one(T))
        end
    end
    return view(Z, :, :, L + 1)
end

function forward_block!(ws::Workspace{T}, U, W, b, σ, c, l, cols) where {T}
    Zl = view(ws.Z, :, cols, l)
    Q = view(ws.Q, :, cols)
    mul!(Q, transpose(view(W, :, :, l)), Zl)
    activate_block!(view(ws.S, :, :, l), view(ws.D, :, :, l), ws.Q, view(b, :, l), σ, cols)
    Zn = view(ws.Z, :, cols, l + 1)
    copyto!(Zn, Zl)
    mul!(Zn, view(U, :, :, l), view(ws.S, :, cols, l), c, one(T))
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
discrete adjoint.
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

    c = T(1 / (L * M))
    cg = T(1 / (L * M) / N)
    mul!(ws.P, a, transpose(r))  # p_L = r a, one column per sample
    for l in L:-1:1
        if ws.threaded
            # by fixed chunks of samples, each task owning some: the previous layer's
            # P += c Pn, T = σ′(q) (U·p_{l+1}), Pn = W T and the chunk's parameter
            # gradients; then the chunk sums, added in chunk order, by particle blocks
            work = N * M * size(U, 1)
            cprev = l == L ? zero(T) : c
            nch = length(ws.chunks)
            foreach_block(nch, work) do ks
                for k in ks
                    adjoint_chunk!(ws, U, W, l, k, cprev)
                end
            end
            foreach_block(M, work) do rows
                reduce_chunks!(ws, l, cg, rows)
            end
        else
            Tm = ws.Tm
            mul!(Tm, transpose(view(U, :, :, l)), ws.P)
            Tm .*= view(ws.D, :, :, l)
            mul!(view(ws.gU, :, :, l), ws.P, transpose(view(ws.S, :, :, l)), cg, zero(T))
            mul!(view(ws.gW, :, :, l), view(ws.Z, :, :, l), transpose(Tm), cg, zero(T))
            sum!(view(ws.gb, :, l:l), Tm)
            view(ws.gb, :, l) .*= cg
            mul!(ws.Pn, view(W, :, :, l), Tm)
            ws.P .+= c .* ws.Pn
        end
    end
    if weight_decay != 0
        wd = T(weight_decay / (L * M))
        ws.gU .+= wd .* U
        ws.gW .+= wd .* W
        ws.gb .+= wd .* b
    end
    return E
end

function adjoint_chunk!(ws::Workspace{T}, U, W, l, k, cprev) where {T}
    cols = ws.chunks[k]
    P = view(ws.P, :, cols)
    if cprev != 0  # p_{l+1} = p_{l+2} + (h/M) Σ W σ′ (U·p_{l+2}), from the previous layer's Pn
        P .+= cprev .* view(ws.Pn, :, cols)
    end
    Tm = view(ws.Tm, :, cols)
    mul!(Tm, transpose(view(U, :, :, l)), P)
    D = ws.D
    @inbounds for i in cols
        @simd for m in axes(D, 1)
            ws.Tm[m, i] *= D[m, i, l]
        end
    end
    mul!(view(ws.Pn, :, cols), view(W, :, :, l), Tm)
    mul!(view(ws.gUp, :, :, k), P, transpose(view(ws.S, :, cols, l)))
    mul!(view(ws.gWp, :, :, k), view(ws.Z, :, cols, l), transpose(Tm))
    mul!(view(ws.gbp, :, k), Tm, view(ws.ones_N, cols))
    return nothing
end

# gU, gW, gb of layer l for the particles `rows`: cg times the chunk sums, in chunk order.
function reduce_chunks!(ws::Workspace{T}, l, cg, rows) where {T}
    nch = length(ws.chunks)
    @inbounds for m in rows
        for j in axes(ws.gU, 1)
            u = zero(T)
            w = zero(T)
            for k in 1:nch
                u += ws.gUp[j, m, k]
                w += ws.gWp[j, m, k]
            end
            ws.gU[j, m, l] = cg * u
            ws.gW[j, m, l] = cg * w
        end
        g = zero(T)
        for k in 1:nch
            g += ws.gbp[m, k]
        end
        ws.gb[m, l] = cg * g
    end
    return nothing
end

"""
    loss_and_grad(U, W, b, X, y, a; activation=:tanh, eta=0.5, weight_decay=0.0)
        -> (E, gU, gW, gb)

E(θ) and ∇E for the net θ = (U, W, b) (layouts in the module docstring).
"""
function loss_and_grad(U, W, b, X, y, a; activation::Symbol = :tanh, eta::Real = 0.5,
                       weight_decay::Real = 0.0)
    ws = Workspace(U, X)
    E = loss_and_grad!(ws, U, W, b, X, y, a, MFRes.activation(activation; eta = eta);
                       weight_decay = weight_decay)
    return E, copy(ws.gU), copy(ws.gW), copy(ws.gb)
end

"""
    loss(U, W, b, X, y, a; activation=:tanh, eta=0.5, weight_decay=0.0) -> E

E(θ) alone (one forward pass).
"""
function loss(U, W, b, X, y, a; activation::Symbol = :tanh, eta::Real = 0.5, weight_decay::Real = 0.0)
    ws = Workspace(U, X)
    zL = forward!(ws, U, W, b, X, MFRes.activation(activation; eta = eta))
    r = transpose(zL) * a .- y
    return 0.5 * Float64(sumsq(r)) / size(X, 2) + decay_term(U, W, b, weight_decay)
end
