# A batch of small nets on the same data, vectorised across the nets.
#
# One small net (N·M·d below PARALLEL_WORK) gives the chunked kernels loops of M or d
# iterations: too short to fill the vector units, with a reduction at the end of each.
# Here K nets (a lane block) are laid out with the net index first, `U, W :: (K, d, M, L)`,
# `b :: (K, M, L)`, and every loop runs over the K nets innermost, K a compile-time
# constant. Each net's sums run in a fixed order (none is split across lanes), and each of
# their terms is added by `fma` (one rounding, in every loop shape; `muladd` is fused or
# not as LLVM sees fit in each loop, which would make a lane's bits depend on the code
# around it; a multiply and an add, as before, took 1.09x the time of a block's step). So
# a net's numbers do not depend on its block, its lane or the thread count; they agree
# with a run of its own (the chunked kernels, whose sums over particles are split by SIMD
# and BLAS) to rounding. (On a CPU without FMA, Julia's `fma` is a correct but slow
# routine: the same numbers.)

"""
    LANES

Nets per lane block: 8, one 512-bit or two 256-bit vectors of Float64. One GD step of a
block at the small size, per net (the fastest of 20 timings of 200 steps, 1 thread, AMD
EPYC Zen 4, skylake-avx512 code): 12.2 µs with 4 lanes, 10.3 with 8, 10.4 with 16.
"""
const LANES = 8

"""
    BatchWorkspace{T,K}(d, M, L, N; memory = :store, derivative = false)

θ and buffers of a lane block of K nets, net index first: θ `U, W (K, d, M, L)`,
`b (K, M, L)`, states `Z (K, d, N, L+1)`, activations `S` (and `D` with `derivative`)
`(K, M, N, Ls)` with `Ls = L` (`:store`) or 1 (`:recompute`), adjoint `P, Pn (K, d, N)`,
`Tm (K, M, N)`, outputs a·z_L `az` and residuals `res (K, N)`, gradient `gU, gW, gb` like θ,
and per net `E` and the RMS velocity `v`. `derivative` is for activations whose σ′ is not
a function of σ.
"""
struct BatchWorkspace{T<:AbstractFloat,K}
    U::Array{T,4}
    W::Array{T,4}
    b::Array{T,3}
    Z::Array{T,4}
    S::Array{T,4}
    D::Array{T,4}
    P::Array{T,3}
    Pn::Array{T,3}
    Tm::Array{T,3}
    az::Matrix{T}
    res::Matrix{T}
    gU::Array{T,4}
    gW::Array{T,4}
    gb::Array{T,3}
    E::Vector{Float64}
    v::Vector{Float64}
    memory::Symbol
end

function BatchWorkspace{T,K}(d::Integer, M::Integer, L::Integer, N::Integer; memory::Symbol = :store,
                             derivative::Bool = false) where {T<:AbstractFloat,K}
    memory in MEMORY_MODES || throw(ArgumentError("memory must be one of $(MEMORY_MODES), got $memory"))
    Ls = memory === :store ? L : 1
    A(dims...) = Array{T}(undef, dims...)
    return BatchWorkspace{T,K}(A(K, d, M, L), A(K, d, M, L), A(K, M, L), A(K, d, N, L + 1), A(K, M, N, Ls),
                               derivative ? A(K, M, N, Ls) : A(0, 0, 0, 0), A(K, d, N), A(K, d, N), A(K, M, N),
                               A(K, N), A(K, N), A(K, d, M, L), A(K, d, M, L), A(K, M, L), zeros(K), zeros(K),
                               memory)
end

lanes(::BatchWorkspace{T,K}) where {T,K} = K

batch_fits(ws::BatchWorkspace{S}, T, d, M, L, N, memory, derivative) where {S} =
    S === T && size(ws.U) == (lanes(ws), d, M, L) && size(ws.Z, 3) == N && ws.memory === memory &&
    (size(ws.D, 1) > 0) == derivative

# Net j's θ into lane r (and back): (d, M, L) ↔ (K, d, M, L).
function load_lane!(ws::BatchWorkspace, r, U, W, b)
    @inbounds for l in axes(U, 3), m in axes(U, 2)
        for j in axes(U, 1)
            ws.U[r, j, m, l] = U[j, m, l]
            ws.W[r, j, m, l] = W[j, m, l]
        end
        ws.b[r, m, l] = b[m, l]
    end
    return nothing
end

function store_lane!(U, W, b, ws::BatchWorkspace, r)
    @inbounds for l in axes(U, 3), m in axes(U, 2)
        for j in axes(U, 1)
            U[j, m, l] = ws.U[r, j, m, l]
            W[j, m, l] = ws.W[r, j, m, l]
        end
        b[m, l] = ws.b[r, m, l]
    end
    return nothing
end

# Samples per tile: the tile's sums share each load of θ (batch_forward!, batch_adjoint!).
# The `*_tile!` functions and the sinks are written out for exactly four samples.
const TILE = 4

# Y[:, m, i] = Σ_j A[:, j, m, l] X[:, j, i] for m in 1:M (one sample i; the sum over the
# D = d rows unrolled, in registers).
@inline function sum_rows!(Y, oy, A, l, X, ox, ::Val{K}, ::Val{D}) where {K,D}
    M = size(A, 3)
    oa = K * D * M * (l - 1)
    @inbounds for m in 1:M
        om = oa + K * D * (m - 1)
        @simd ivdep for r in 1:K
            s = A[om + r] * X[ox + r]
            for j in 2:D
                s = fma(A[om + K * (j - 1) + r], X[ox + K * (j - 1) + r], s)
            end
            Y[oy + K * (m - 1) + r] = s
        end
    end
    return nothing
end

# sum_rows! for the TILE = 4 samples of a tile at once (X_t at ox + K·D·(t−1)): each
# A[:, :, m, l] loaded once for the four, each sum in the same order; the four sums of row m,
# lane r go to `sink(m, r, s1, s2, s3, s4)`.
@inline function sum_rows_tile!(sink, A, l, X, ox, ::Val{K}, ::Val{D}) where {K,D}
    M = size(A, 3)
    oa = K * D * M * (l - 1)
    kd = K * D
    @inbounds for m in 1:M
        om = oa + kd * (m - 1)
        @simd ivdep for r in 1:K
            w = A[om + r]
            s1, s2, s3, s4 = w * X[ox + r], w * X[ox + kd + r], w * X[ox + 2kd + r], w * X[ox + 3kd + r]
            for j in 2:D
                w = A[om + K * (j - 1) + r]
                q = ox + K * (j - 1) + r
                s1, s2, s3, s4 = fma(w, X[q], s1), fma(w, X[q + kd], s2), fma(w, X[q + 2kd], s3), fma(w, X[q + 3kd], s4)
            end
            sink(m, r, s1, s2, s3, s4)
        end
    end
    return nothing
end

# Sinks of sum_rows_tile!: Y_t[:, m] = s_t (Y_t at oy + K·M·(t−1)) ...
struct StoreRows{T,N,K}
    Y::Array{T,N}
    oy::Int
    M::Int
end
@inline function (snk::StoreRows{T,N,K})(m, r, s1, s2, s3, s4) where {T,N,K}
    o, km = snk.oy + K * (m - 1) + r, K * snk.M
    @inbounds snk.Y[o], snk.Y[o + km], snk.Y[o + 2km], snk.Y[o + 3km] = s1, s2, s3, s4
    return nothing
end

# ... and the adjoint's T_t = s_t ⊙ σ′ (σ′ = f(src), src the stored σ or σ′ at os), added to gb
# in sample order.
struct TimesDerivative{T,N,K,F}
    Tm::Array{T,3}
    ot::Int
    src::Array{T,N}
    os::Int
    gb::Array{T,3}
    ob::Int
    M::Int
    f::F
end
@inline function (snk::TimesDerivative{T,N,K})(m, r, s1, s2, s3, s4) where {T,N,K}
    o, km = K * (m - 1) + r, K * snk.M
    @inbounds begin
        c = snk.os + o
        t1, t2, t3, t4 = s1 * snk.f(snk.src[c]), s2 * snk.f(snk.src[c + km]), s3 * snk.f(snk.src[c + 2km]), s4 * snk.f(snk.src[c + 3km])
        c = snk.ot + o
        snk.Tm[c], snk.Tm[c + km], snk.Tm[c + 2km], snk.Tm[c + 3km] = t1, t2, t3, t4
        snk.gb[snk.ob + o] = (((snk.gb[snk.ob + o] + t1) + t2) + t3) + t4
    end
    return nothing
end

# acc[:, j] = Σ_m A[:, j, m, l] Y[:, m, i] for j in 1:D (one sample i; acc at oc), the sum
# over m in order; four particles per pass over acc (the same additions, a quarter of acc's
# loads and stores).
@inline function sum_particles!(acc, oc, A, l, Y, oy, ::Val{K}, ::Val{D}) where {K,D}
    M = size(A, 3)
    oa = K * D * M * (l - 1)
    kd = K * D
    @inbounds begin
        @simd ivdep for r in 1:K
            s = Y[oy + r]
            for j in 1:D
                acc[oc + K * (j - 1) + r] = A[oa + K * (j - 1) + r] * s
            end
        end
        m = 2
        while m + 3 <= M
            om = oa + kd * (m - 1)
            oym = oy + K * (m - 1)
            @simd ivdep for r in 1:K
                s1, s2, s3, s4 = Y[oym + r], Y[oym + K + r], Y[oym + 2K + r], Y[oym + 3K + r]
                for j in 1:D
                    o = om + K * (j - 1) + r
                    c = oc + K * (j - 1) + r
                    acc[c] = fma(A[o + 3kd], s4, fma(A[o + 2kd], s3, fma(A[o + kd], s2, fma(A[o], s1, acc[c]))))
                end
            end
            m += 4
        end
        while m <= M
            om = oa + kd * (m - 1)
            @simd ivdep for r in 1:K
                s = Y[oy + K * (m - 1) + r]
                for j in 1:D
                    c = oc + K * (j - 1) + r
                    acc[c] = fma(A[om + K * (j - 1) + r], s, acc[c])
                end
            end
            m += 1
        end
    end
    return nothing
end

# sum_particles! for the TILE = 4 samples of a tile at once (acc_t at oc + K·D·(t−1), Y_t at
# oy + K·M·(t−1)): each A[:, :, m, l] loaded once for the four, each sum in the same order;
# two particles per pass (four, with sixteen values of Y, did not vectorise).
@inline function sum_particles_tile!(acc, oc, A, l, Y, oy, ::Val{K}, ::Val{D}) where {K,D}
    M = size(A, 3)
    oa = K * D * M * (l - 1)
    kd, km = K * D, K * M
    @inbounds begin
        @simd ivdep for r in 1:K
            y1, y2, y3, y4 = Y[oy + r], Y[oy + km + r], Y[oy + 2km + r], Y[oy + 3km + r]
            for j in 1:D
                w = A[oa + K * (j - 1) + r]
                g = oc + K * (j - 1) + r
                acc[g], acc[g + kd], acc[g + 2kd], acc[g + 3kd] = w * y1, w * y2, w * y3, w * y4
            end
        end
        m = 2
        while m + 1 <= M
            om = oa + kd * (m - 1)
            oym = oy + K * (m - 1)
            @simd ivdep for r in 1:K
                o = oym + r
                a1, a2 = Y[o], Y[o + K]
                b1, b2 = Y[o + km], Y[o + km + K]
                c1, c2 = Y[o + 2km], Y[o + 2km + K]
                d1, d2 = Y[o + 3km], Y[o + 3km + K]
                for j in 1:D
                    q = om + K * (j - 1) + r
                    w1, w2 = A[q], A[q + kd]
                    g = oc + K * (j - 1) + r
                    acc[g] = fma(w2, a2, fma(w1, a1, acc[g]))
                    acc[g + kd] = fma(w2, b2, fma(w1, b1, acc[g + kd]))
                    acc[g + 2kd] = fma(w2, c2, fma(w1, c1, acc[g + 2kd]))
                    acc[g + 3kd] = fma(w2, d2, fma(w1, d1, acc[g + 3kd]))
                end
            end
            m += 2
        end
        while m <= M
            om = oa + kd * (m - 1)
            @simd ivdep for r in 1:K
                o = oy + K * (m - 1) + r
                y1, y2, y3, y4 = Y[o], Y[o + km], Y[o + 2km], Y[o + 3km]
                for j in 1:D
                    w = A[om + K * (j - 1) + r]
                    g = oc + K * (j - 1) + r
                    acc[g] = fma(w, y1, acc[g])
                    acc[g + kd] = fma(w, y2, acc[g + kd])
                    acc[g + 2kd] = fma(w, y3, acc[g + 2kd])
                    acc[g + 3kd] = fma(w, y4, acc[g + 3kd])
                end
            end
            m += 1
        end
    end
    return nothing
end

# sum_particles! of nt ≤ TILE consecutive samples: a whole tile at once, else one at a time.
@inline function sum_particles_n!(acc, oc, A, l, Y, oy, nt, vk::Val{K}, vd::Val{D}) where {K,D}
    if nt == TILE
        sum_particles_tile!(acc, oc, A, l, Y, oy, vk, vd)
    else
        for n in 0:(nt - 1)
            sum_particles!(acc, oc + K * D * n, A, l, Y, oy + K * size(A, 3) * n, vk, vd)
        end
    end
    return nothing
end

# S[:, :, i, ls] = σ(Σ_j W[:, j, :, l] Z[:, j, i, l] + b[:, :, l]) for the nt ≤ TILE samples
# i0:(i0 + nt − 1) (and σ′ into D), the activation as one flat loop over each sample's K·M values.
@inline function layer_activations!(ws::BatchWorkspace{T,K}, σ::Activation, l, ls, i0, nt, D, vd) where {T,K}
    W, Z, S, b = ws.W, ws.Z, ws.S, ws.b
    d, M, N = size(W, 2), size(W, 3), size(ws.Z, 3)
    os = K * M * ((ls - 1) * N + i0 - 1)
    oz = K * d * ((l - 1) * N + i0 - 1)
    if nt == TILE
        sum_rows_tile!(StoreRows{T,ndims(S),K}(S, os, M), W, l, Z, oz, Val(K), vd)
    else
        for n in 0:(nt - 1)
            sum_rows!(S, os + K * M * n, W, l, Z, oz + K * d * n, Val(K), vd)
        end
    end
    ob = K * M * (l - 1)
    for t in 0:(nt - 1)
        ot = os + K * M * t
        if D === nothing
            @inbounds @simd ivdep for k in 1:(K * M)
                S[ot + k] = value_and_derivative(σ, S[ot + k] + b[ob + k], host_tanh)[1]
            end
        else
            @inbounds @simd ivdep for k in 1:(K * M)
                s, ds = value_and_derivative(σ, S[ot + k] + b[ob + k], host_tanh)
                S[ot + k] = s
                D[ot + k] = ds
            end
        end
    end
    return nothing
end

# z_{l+1} = z_l + (h/M) Σ_m U[:, :, m, l] σ(q_m), for all samples (in tiles of TILE), every layer.
batch_forward!(ws::BatchWorkspace, X, σ::Activation) = batch_forward!(ws, X, σ, Val(size(ws.U, 2)))

function batch_forward!(ws::BatchWorkspace{T,K}, X, σ::Activation, vd::Val{d}) where {T,K,d}
    M, L = size(ws.U, 3), size(ws.U, 4)
    N = size(ws.Z, 3)
    c = T(1 / (L * M))
    U, Z, S = ws.U, ws.Z, ws.S
    D = keeps_derivative(ws.memory, σ) ? ws.D : nothing
    @inbounds for i in 1:N, j in 1:d
        @simd ivdep for r in 1:K
            Z[r, j, i, 1] = X[j, i]
        end
    end
    for l in 1:L
        ls = slot(ws, l)
        i0 = 1
        # the sums over particles go straight into z_{l+1}, then z_{l+1} = z_l + c·(sum)
        @inbounds while i0 <= N
            nt = min(TILE, N - i0 + 1)
            layer_activations!(ws, σ, l, ls, i0, nt, D, vd)
            os = K * M * ((ls - 1) * N + i0 - 1)
            oz = K * d * ((l - 1) * N + i0 - 1)
            on = K * d * (l * N + i0 - 1)
            sum_particles_n!(Z, on, U, l, S, os, nt, Val(K), vd)
            @simd ivdep for k in 1:(K * d * nt)
                Z[on + k] = c * Z[on + k] + Z[oz + k]
            end
            i0 += nt
        end
    end
    return nothing
end

# Per net: Σ over the lane's entries of A (K × anything), in Float64, into out (added).
function lane_sumsq!(out::Vector{Float64}, A::AbstractArray{T}, ::Val{K}) where {T,K}
    n = length(A) ÷ K
    k = 0
    # four entries per pass over out, added in order (out is stored and reloaded once per pass)
    @inbounds while k + 3 < n
        @simd ivdep for r in 1:K
            o = k * K + r
            a1, a2, a3, a4 = Float64(A[o]), Float64(A[o + K]), Float64(A[o + 2K]), Float64(A[o + 3K])
            out[r] = (((out[r] + a1^2) + a2^2) + a3^2) + a4^2
        end
        k += 4
    end
    @inbounds while k < n
        @simd ivdep for r in 1:K
            out[r] += Float64(A[k * K + r])^2
        end
        k += 1
    end
    return out
end

# E of every lane (ws.E), outputs (ws.az), residuals (ws.res) and p_L = r a (ws.P) from the last
# forward pass.
function batch_loss!(ws::BatchWorkspace{T,K}, y, a, weight_decay) where {T,K}
    d, M, L = size(ws.U, 2), size(ws.U, 3), size(ws.U, 4)
    N = size(ws.Z, 3)
    Z, az, res, P, E = ws.Z, ws.az, ws.res, ws.P, ws.E
    fill!(E, 0.0)
    @inbounds for i in 1:N
        @simd ivdep for r in 1:K
            az[r, i] = Z[r, 1, i, L + 1] * a[1]
        end
        for j in 2:d
            @simd ivdep for r in 1:K
                az[r, i] = fma(Z[r, j, i, L + 1], a[j], az[r, i])
            end
        end
        @simd ivdep for r in 1:K
            res[r, i] = az[r, i] - y[i]
            E[r] += Float64(res[r, i])^2
        end
        for j in 1:d
            @simd ivdep for r in 1:K
                P[r, j, i] = a[j] * res[r, i]
            end
        end
    end
    E .*= 0.5 / N
    if weight_decay != 0
        sq = zeros(K)
        lane_sumsq!(sq, ws.U, Val(K))
        lane_sumsq!(sq, ws.W, Val(K))
        lane_sumsq!(sq, ws.b, Val(K))
        E .+= (0.5 * weight_decay / (L * M)) .* sq
    end
    return E
end

# gU[:, :, m, l] += Σ p sᵀ and gW[:, :, m, l] += Σ z Tᵀ over nt ≤ TILE consecutive samples
# (op, oz, os, ot: the first one's offsets in P, Z, S, Tm), their terms added in sample order.
@inline function add_outers!(gU, gW, og, P, Z, S, Tm, op, oz, os, ot, nt, M, vk::Val{K}, vd::Val{D}) where {K,D}
    if nt == TILE
        add_outer_tile!(gU, og, P, op, S, os, M, vk, vd)
        add_outer_tile!(gW, og, Z, oz, Tm, ot, M, vk, vd)
    else
        for n in 0:(nt - 1)
            add_outer!(gU, og, P, op + K * D * n, S, os + K * M * n, M, vk, vd)
            add_outer!(gW, og, Z, oz + K * D * n, Tm, ot + K * M * n, M, vk, vd)
        end
    end
    return nothing
end

# G[:, :, m, l] += x yᵀ of one sample (x at ox, y at oy).
@inline function add_outer!(G, og, X, ox, Y, oy, M, ::Val{K}, ::Val{D}) where {K,D}
    @inbounds for m in 1:M
        om = og + K * D * (m - 1)
        @simd ivdep for r in 1:K
            y = Y[oy + K * (m - 1) + r]
            for j in 1:D
                o = om + K * (j - 1) + r
                G[o] = fma(X[ox + K * (j - 1) + r], y, G[o])
            end
        end
    end
    return nothing
end

# G[:, :, m, l] += Σ_i x_i y_iᵀ over the TILE = 4 samples of a tile (x_i at ox + K·D·(i−1),
# y_i at oy + K·M·(i−1)), in sample order; two particles per pass (each load of x serves both).
@inline function add_outer_tile!(G, og, X, ox, Y, oy, M, ::Val{K}, ::Val{D}) where {K,D}
    kd, km = K * D, K * M
    m = 1
    @inbounds while m + 1 <= M
        om = og + kd * (m - 1)
        oym = oy + K * (m - 1)
        @simd ivdep for r in 1:K
            o = oym + r
            y1, y2, y3, y4 = Y[o], Y[o + km], Y[o + 2km], Y[o + 3km]  # particle m
            v1, v2, v3, v4 = Y[o + K], Y[o + km + K], Y[o + 2km + K], Y[o + 3km + K]  # and m + 1
            for j in 1:D
                q = ox + K * (j - 1) + r
                x1, x2, x3, x4 = X[q], X[q + kd], X[q + 2kd], X[q + 3kd]
                g = om + K * (j - 1) + r
                G[g] = fma(x4, y4, fma(x3, y3, fma(x2, y2, fma(x1, y1, G[g]))))
                G[g + kd] = fma(x4, v4, fma(x3, v3, fma(x2, v2, fma(x1, v1, G[g + kd]))))
            end
        end
        m += 2
    end
    @inbounds if m == M
        om = og + kd * (m - 1)
        oym = oy + K * (m - 1)
        @simd ivdep for r in 1:K
            y1, y2, y3, y4 = Y[oym + r], Y[oym + km + r], Y[oym + 2km + r], Y[oym + 3km + r]
            for j in 1:D
                g = om + K * (j - 1) + r
                q = ox + K * (j - 1) + r
                G[g] = fma(X[q + 3kd], y4, fma(X[q + 2kd], y3, fma(X[q + kd], y2, fma(X[q], y1, G[g]))))
            end
        end
    end
    return nothing
end

# The discrete adjoint, layer by layer from L to 1, in tiles of TILE samples: p_{l} = p_{l+1} +
# (h/M) W (σ′ ⊙ Uᵀ p_{l+1}), and the sums over samples of p sᵀ, z Tᵀ and T (in sample
# order), scaled by (h/M)/N.
batch_adjoint!(ws::BatchWorkspace, σ::Activation) = batch_adjoint!(ws, σ, Val(size(ws.U, 2)))

function batch_adjoint!(ws::BatchWorkspace{T,K}, σ::Activation, vd::Val{d}) where {T,K,d}
    M, L = size(ws.U, 3), size(ws.U, 4)
    N = size(ws.Z, 3)
    c = T(1 / (L * M))
    cg = T(1 / (L * M) / N)
    U, W, Z, S, P, Pn, Tm = ws.U, ws.W, ws.Z, ws.S, ws.P, ws.Pn, ws.Tm
    gU, gW, gb = ws.gU, ws.gW, ws.gb
    recompute = ws.memory === :recompute
    fromS = derivative_from_value(σ)
    D = fromS ? nothing : ws.D
    src, f = fromS ? (S, DerivativeOfValue(σ)) : (D, identity)  # σ′ = f(src)
    for l in L:-1:1
        ls = slot(ws, l)
        og = K * d * M * (l - 1)
        @inbounds @simd ivdep for k in 1:(K * d * M)
            gU[og + k] = zero(T)
            gW[og + k] = zero(T)
        end
        @inbounds @simd ivdep for k in (K * M * (l - 1) + 1):(K * M * l)
            gb[k] = zero(T)
        end
        # Each tile takes one pass over the layer's U, W, gU, gW, gb (its terms added in sample
        # order, as one sample at a time would); the samples left over go one by one.
        i0 = 1
        @inbounds while i0 <= N
            nt = min(TILE, N - i0 + 1)
            op, ot = K * d * (i0 - 1), K * M * (i0 - 1)
            os = K * M * ((ls - 1) * N + i0 - 1)
            if l < L
                @simd ivdep for k in (op + 1):(op + K * d * nt)
                    P[k] = c * Pn[k] + P[k]
                end
            end
            recompute && layer_activations!(ws, σ, l, 1, i0, nt, D, vd)
            ob = K * M * (l - 1)
            if nt == TILE  # T = σ′ ⊙ Uᵀp and gb as each row's sums come
                sink = TimesDerivative{T,ndims(src),K,typeof(f)}(Tm, ot, src, os, gb, ob, M, f)
                sum_rows_tile!(sink, U, l, P, op, Val(K), vd)
            else
                for n in 0:(nt - 1)
                    on, osn = ot + K * M * n, os + K * M * n
                    sum_rows!(Tm, on, U, l, P, op + K * d * n, Val(K), vd)
                    @simd ivdep for k in 1:(K * M)
                        t = Tm[on + k] * f(src[osn + k])
                        Tm[on + k] = t
                        gb[ob + k] += t
                    end
                end
            end
            add_outers!(gU, gW, og, P, Z, S, Tm, op, K * d * ((l - 1) * N + i0 - 1), os, ot, nt, M, Val(K), vd)
            sum_particles_n!(Pn, op, W, l, Tm, ot, nt, Val(K), vd)
            i0 += nt
        end
        @inbounds @simd ivdep for k in 1:(K * d * M)
            gU[og + k] *= cg
            gW[og + k] *= cg
        end
        @inbounds @simd ivdep for k in (K * M * (l - 1) + 1):(K * M * l)
            gb[k] *= cg
        end
    end
    return nothing
end

# y ← y + α x entry by entry, in one flat loop (a broadcast runs over all four axes)
function add_scaled!(y::Array{T}, α::T, x::Array{T}) where {T}
    @inbounds @simd ivdep for k in eachindex(y, x)
        y[k] += α * x[k]
    end
    return y
end

# E (ws.E), ∇E (ws.gU, gW, gb) and the RMS velocity (ws.v) of every lane at ws's θ.
function batch_loss_and_grad!(ws::BatchWorkspace{T,K}, X, y, a, σ::Activation, weight_decay) where {T,K}
    M, L = size(ws.U, 3), size(ws.U, 4)
    batch_forward!(ws, X, σ)
    batch_loss!(ws, y, a, weight_decay)
    batch_adjoint!(ws, σ)
    if weight_decay != 0
        wd = T(weight_decay / (L * M))
        add_scaled!(ws.gU, wd, ws.U)
        add_scaled!(ws.gW, wd, ws.W)
        add_scaled!(ws.gb, wd, ws.b)
    end
    v = fill!(ws.v, 0.0)
    lane_sumsq!(v, ws.gU, Val(K))
    lane_sumsq!(v, ws.gW, Val(K))
    lane_sumsq!(v, ws.gb, Val(K))
    v .= (L * M) .* sqrt.(v ./ (L * M))
    return nothing
end

"""
    batch_gd!(ws, X, y, a, Δs, nsteps, σ; weight_decay, losses, norms, columns)

`nsteps` GD steps of pseudo-time `Δs` for the K nets held in `ws` (θ ← θ − Δs L M ∇E per
net); lane r's E and RMS velocity before each step and after the last go to
`losses[:, columns[r]]`, `norms[:, columns[r]]`.
"""
function batch_gd!(ws::BatchWorkspace{T,K}, X, y, a, Δs::Real, nsteps::Integer, σ::Activation;
                   weight_decay::Real, losses::AbstractMatrix{Float64}, norms::AbstractMatrix{Float64},
                   columns) where {T,K}
    M, L = size(ws.U, 3), size(ws.U, 4)
    step = T(Δs * L * M)
    for k in 0:nsteps
        batch_loss_and_grad!(ws, X, y, a, σ, weight_decay)
        for (r, j) in enumerate(columns)
            losses[k + 1, j] = ws.E[r]
            norms[k + 1, j] = ws.v[r]
        end
        k == nsteps && break
        add_scaled!(ws.U, -step, ws.gU)
        add_scaled!(ws.W, -step, ws.gW)
        add_scaled!(ws.b, -step, ws.gb)
    end
    return nothing
end

# The output a·z_L(x_i) of lane r at the last forward pass (the one that gave its residual).
lane_predictions!(out, ws::BatchWorkspace, r) = copyto!(out, view(ws.az, r, :))
