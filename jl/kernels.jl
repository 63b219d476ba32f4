# Forward pass, loss and discrete adjoint on a Workspace (MODEL.md, "Gradient").
# Matrix products go to mul! (BLAS, or CUBLAS for GPU arrays); the element-wise
# work is either a threaded loop over samples (CPU arrays) or broadcasting (any
# array type: the generic path). Each sum over samples is done by one task, in a
# fixed order, so results do not depend on the number of threads.

# σ and σ′ of (Q + b) for one layer, into S and D (all M × N).
function activate!(S, D, Q, b, σ::Activation, threaded::Bool)
    if threaded && Threads.nthreads() > 1
        Threads.@threads for i in axes(Q, 2)
            activate_column!(S, D, Q, b, σ, i)
        end
    elseif threaded
        for i in axes(Q, 2)
            activate_column!(S, D, Q, b, σ, i)
        end
    else
        Q .+= b
        S .= Value(σ).(Q)
        D .= Derivative(σ).(Q)
    end
    return nothing
end

@inline function activate_column!(S, D, Q, b, σ, i)
    @inbounds @simd for m in axes(Q, 1)
        s, ds = value_and_derivative(σ, Q[m, i] + b[m])
        S[m, i] = s
        D[m, i] = ds
    end
    return nothing
end

# T .*= D, the element-wise step of the adjoint.
function scale_by!(T, D, threaded::Bool)
    if threaded && Threads.nthreads() > 1
        Threads.@threads for i in axes(T, 2)
            @inbounds @simd for m in axes(T, 1)
                T[m, i] *= D[m, i]
            end
        end
    else
        T .*= D
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
        Zl = view(Z, :, :, l)
        Sl = view(ws.S, :, :, l)
        mul!(ws.Q, transpose(view(W, :, :, l)), Zl)
        activate!(Sl, view(ws.D, :, :, l), ws.Q, view(b, :, l), σ, ws.threaded)
        Zn = view(Z, :, :, l + 1)
        copyto!(Zn, Zl)
        mul!(Zn, view(U, :, :, l), Sl, c, one(T))
    end
    return view(Z, :, :, L + 1)
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
discrete adjoint. Allocation-free on CPU arrays with one thread.
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
    P, Pn, Tm = ws.P, ws.Pn, ws.Tm
    mul!(P, a, transpose(r))  # p_L = r a, one column per sample
    for l in L:-1:1
        Ul = view(U, :, :, l)
        Wl = view(W, :, :, l)
        mul!(Tm, transpose(Ul), P)            # U·p_{l+1}
        scale_by!(Tm, view(ws.D, :, :, l), ws.threaded)
        mul!(view(ws.gU, :, :, l), P, transpose(view(ws.S, :, :, l)), cg, zero(T))
        mul!(view(ws.gW, :, :, l), view(ws.Z, :, :, l), transpose(Tm), cg, zero(T))
        sum!(view(ws.gb, :, l:l), Tm)
        mul!(Pn, Wl, Tm)
        P .+= c .* Pn
    end
    ws.gb .*= cg
    if weight_decay != 0
        wd = T(weight_decay / (L * M))
        ws.gU .+= wd .* U
        ws.gW .+= wd .* W
        ws.gb .+= wd .* b
    end
    return E
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
