# The chunked kernels' matrix products, as plain loops.
#
# Every product of a chunk has one dimension of size d (small: the data dimension) and
# the others M and C (the chunk's samples). On such shapes single-threaded BLAS runs far
# from its rate (at (M, d, C) = (128, 8, 64) about 10 GFLOP/s where a 2048² dgemm gives
# 40–60). These loops keep the particle index m innermost and contiguous (so that it
# vectorises) and work on register tiles, 4 samples × 4 rows of the d side (2 × 4 for the
# sums over m): each element loaded from At, X or Y feeds 4 fused multiply-adds instead
# of 1. Against one sample at a time that gave 1.5–2.1× the rate at the chunk shapes of
# the benchmark sizes (AMD EPYC Zen 4, haswell code, benchmarks/julia_products.jl). They
# need the layer's weights as M × d matrices (`transpose_layers!`). Each output element
# is summed in a fixed order that depends on the shapes only, so the results do not
# depend on the thread count; `mul_tall!` and `mul_outer!` add their terms one at a time
# in index order, as a scalar loop would.

"""
    transpose_layers!(At, A)

`At[:, :, l] = A[:, :, l]ᵀ` for every layer: `(d, M, L)` into `(M, d, L)`.
"""
function transpose_layers!(At::AbstractArray{T,3}, A::AbstractArray{T,3}) where {T}
    d, M, L = size(A)
    @inbounds for l in 1:L, m in 1:M, j in 1:d
        At[m, j, l] = A[j, m, l]
    end
    return At
end

# The operands are matrices or contiguous views of them (`view(A, :, cols, l)`), indexed
# linearly: with 2-d indexing of such views the sums over m ran 1.6–2× slower.

# Y[oy .+ (1:n)] += a X[ox .+ (1:n)]: the inner loop of `mul_outer!` for a lone sample.
@inline function axpy_at!(Y, oy, a, X, ox, n)
    @inbounds @simd ivdep for m in 1:n
        Y[oy + m] = muladd(X[ox + m], a, Y[oy + m])
    end
    return nothing
end

# The 4 entries Z[j:j+3, i] (Z with d rows, linearly indexed).
@inline col4(Z, d, j, i) = (o = d * (i - 1) + j; @inbounds (Z[o], Z[o + 1], Z[o + 2], Z[o + 3]))

# The tiling of `mul_tall!` over the samples i1:i2 (a multiple of 4 of them): `tile!(i, j)`
# for every tile of samples i:i+3 and rows j:j+3, then `row!(i, j)` for the rows left over
# (d not a multiple of 4), j in order within each group of samples.
@inline function each_tile4(tile!, row!, i1, i2, d)
    for i in i1:4:(i2 - 3)
        j = 1
        while j + 3 <= d
            tile!(i, j)
            j += 4
        end
        for jj in j:d
            row!(i, jj)
        end
    end
    return nothing
end

# The tiles of `each_tile4` (all of 1:C) for `mul_outer!`, the groups of rows outermost: `tile!(i, j)`
# for every group of samples i:i+3 in order, one group of rows j:j+3 after the other, then
# `row!` likewise for each row left over. Each output element still gets its terms in
# sample order, while the 4 rows' slice of the output stays in L1 cache across all the
# chunk's samples: with the samples outermost the whole M × d output (64 KiB at M = 512,
# d = 16) went to and from L2 once per group of samples. The price: X (M × C, up to 1 MiB)
# is read d/4 times instead of once (measured faster at the large size, level at medium).
@inline function each_tile4_rows_outer(tile!, row!, C, d)
    C4 = C - C % 4
    j = 1
    while j + 3 <= d
        for i in 1:4:C4
            tile!(i, j)
        end
        j += 4
    end
    for jj in j:d, i in 1:4:C4
        row!(i, jj)
    end
    return C4 + 1
end

"""
    mul_tall!(Y, At, Z, done! = nothing)

`Y = At Z`, i.e. `Y[:, i] = Σ_j At[:, j] Z[j, i]` (At: M × d; Y: M × C; Z: d × C), each
element summed over j in order. `done!(i1, i2)`, if given, runs as soon as the columns
`i1:i2` of Y are complete, in order: groups of whole tiles of 4 samples, each of at least
`DONE_ELEMENTS` elements but the last, then the samples left over one by one. The
kernels apply the activation (forward pass) or σ′ (adjoint) there, on columns still in
cache, instead of in a pass of their own over the chunk.
"""
function mul_tall!(Y, At, Z, done!::F = nothing) where {F}  # (F: specialise on done!, which is only passed on)
    M, d = size(At, 1), size(At, 2)
    C = size(Z, 2)
    C4 = C - C % 4
    g = 4 * cld(DONE_ELEMENTS, 4 * max(M, 1))  # samples per group
    for i1 in 1:g:C4
        i2 = min(i1 + g - 1, C4)
        each_tile4((i, j) -> tall_tile!(Y, At, Z, M, d, i, j), (i, j) -> tall_row!(Y, At, Z, M, d, i, j), i1, i2, d)
        after!(done!, i1, i2)
    end
    for ii in (C4 + 1):C  # the last samples, one at a time
        @inbounds for j in 1:d
            a, oy, oa = Z[d * (ii - 1) + j], M * (ii - 1), M * (j - 1)
            @simd ivdep for m in 1:M
                Y[oy + m] = j == 1 ? At[oa + m] * a : muladd(At[oa + m], a, Y[oy + m])
            end
        end
        after!(done!, ii, ii)
    end
    return Y
end

# `mul_tall!` calls `done!` on groups of samples of at least this many elements (whole
# tiles of 4 samples): the activation's flat loop needs some length to run at full rate.
const DONE_ELEMENTS = 2048

@inline after!(::Nothing, i1, i2) = nothing
@inline after!(done!, i1, i2) = done!(i1, i2)

# Y[:, i:i+3] (+)= At[:, j:j+3] Z[j:j+3, i:i+3] (= when j == 1).
function tall_tile!(Y, At, Z, M, d, i, j)
    z1, z2, z3, z4 = col4(Z, d, j, i), col4(Z, d, j, i + 1), col4(Z, d, j, i + 2), col4(Z, d, j, i + 3)
    o1, o2, o3, o4 = M * (i - 1), M * i, M * (i + 1), M * (i + 2)
    oa = M * (j - 1)
    first = j == 1
    @inbounds @simd ivdep for m in 1:M
        w1, w2, w3, w4 = At[oa + m], At[oa + M + m], At[oa + 2M + m], At[oa + 3M + m]
        y1 = first ? w1 * z1[1] : muladd(w1, z1[1], Y[o1 + m])
        y2 = first ? w1 * z2[1] : muladd(w1, z2[1], Y[o2 + m])
        y3 = first ? w1 * z3[1] : muladd(w1, z3[1], Y[o3 + m])
        y4 = first ? w1 * z4[1] : muladd(w1, z4[1], Y[o4 + m])
        y1, y2, y3, y4 = muladd(w2, z1[2], y1), muladd(w2, z2[2], y2), muladd(w2, z3[2], y3), muladd(w2, z4[2], y4)
        y1, y2, y3, y4 = muladd(w3, z1[3], y1), muladd(w3, z2[3], y2), muladd(w3, z3[3], y3), muladd(w3, z4[3], y4)
        y1, y2, y3, y4 = muladd(w4, z1[4], y1), muladd(w4, z2[4], y2), muladd(w4, z3[4], y3), muladd(w4, z4[4], y4)
        Y[o1 + m], Y[o2 + m], Y[o3 + m], Y[o4 + m] = y1, y2, y3, y4
    end
    return nothing
end

# Y[:, i:i+3] (+)= At[:, j] Z[j, i:i+3] (= when j == 1).
function tall_row!(Y, At, Z, M, d, i, j)
    @inbounds a1, a2, a3, a4 = Z[d * (i - 1) + j], Z[d * i + j], Z[d * (i + 1) + j], Z[d * (i + 2) + j]
    o1, o2, o3, o4 = M * (i - 1), M * i, M * (i + 1), M * (i + 2)
    oa = M * (j - 1)
    first = j == 1
    @inbounds @simd ivdep for m in 1:M
        w = At[oa + m]
        Y[o1 + m] = first ? w * a1 : muladd(w, a1, Y[o1 + m])
        Y[o2 + m] = first ? w * a2 : muladd(w, a2, Y[o2 + m])
        Y[o3 + m] = first ? w * a3 : muladd(w, a3, Y[o3 + m])
        Y[o4 + m] = first ? w * a4 : muladd(w, a4, Y[o4 + m])
    end
    return nothing
end

"""
    mul_short!(Y, At, X, α, β)

`Y = β Y + α Atᵀ X`, i.e. `Y[j, i] = β Y[j, i] + α Σ_m At[m, j] X[m, i]` (At: M × d;
X: M × C; Y: d × C); β = 0 ignores Y's old values. The sums over m run 2 samples × 4
rows at a time (8 sums in one pass over m).
"""
function mul_short!(Y, At, X, α, β)
    M, d = size(At, 1), size(At, 2)
    C = size(X, 2)
    C2 = C - C % 2
    j = 1
    while j + 3 <= d  # rows outermost: At's 4 columns stay in L1 cache (X is read d/4 times)
        for i in 1:2:C2
            short_tile!(Y, At, X, α, β, M, d, i, j)
        end
        j += 4
    end
    for jj in j:d, ii in 1:C2
        short_one!(Y, At, X, α, β, M, d, ii, jj)
    end
    for ii in (C2 + 1):C, jj in 1:d
        short_one!(Y, At, X, α, β, M, d, ii, jj)
    end
    return Y
end

@inline function set_short!(Y, α, β, k, s)
    @inbounds Y[k] = iszero(β) ? α * s : muladd(α, s, β * Y[k])
    return nothing
end

# Y[j:j+3, i:i+1] from the 8 sums over m.
function short_tile!(Y, At, X, α, β, M, d, i, j)
    T = eltype(Y)
    ox1, ox2 = M * (i - 1), M * i
    oa = M * (j - 1)
    s11 = s12 = s13 = s14 = s21 = s22 = s23 = s24 = zero(T)
    @inbounds @simd for m in 1:M
        w1, w2, w3, w4 = At[oa + m], At[oa + M + m], At[oa + 2M + m], At[oa + 3M + m]
        x = X[ox1 + m]
        s11, s12, s13, s14 = muladd(w1, x, s11), muladd(w2, x, s12), muladd(w3, x, s13), muladd(w4, x, s14)
        x = X[ox2 + m]
        s21, s22, s23, s24 = muladd(w1, x, s21), muladd(w2, x, s22), muladd(w3, x, s23), muladd(w4, x, s24)
    end
    k1, k2 = d * (i - 1) + j, d * i + j
    set_short!(Y, α, β, k1, s11); set_short!(Y, α, β, k1 + 1, s12)
    set_short!(Y, α, β, k1 + 2, s13); set_short!(Y, α, β, k1 + 3, s14)
    set_short!(Y, α, β, k2, s21); set_short!(Y, α, β, k2 + 1, s22)
    set_short!(Y, α, β, k2 + 2, s23); set_short!(Y, α, β, k2 + 3, s24)
    return nothing
end

# Y[j, i] alone.
function short_one!(Y, At, X, α, β, M, d, i, j)
    ox, oa = M * (i - 1), M * (j - 1)
    s = zero(eltype(Y))
    @inbounds @simd for m in 1:M
        s = muladd(At[oa + m], X[ox + m], s)
    end
    set_short!(Y, α, β, d * (i - 1) + j, s)
    return nothing
end

"""
    mul_outer!(G, X, Z)

`G = X Zᵀ`, i.e. `G[:, j] = Σ_i X[:, i] Z[j, i]` (X: M × C; Z: d × C; G: M × d), each
element summed over i in order.
"""
function mul_outer!(G, X, Z)
    M, d = size(X, 1), size(Z, 1)
    C = size(X, 2)
    fill!(G, zero(eltype(G)))
    i = each_tile4_rows_outer((i, j) -> outer_tile!(G, X, Z, M, d, i, j), (i, j) -> outer_row!(G, X, Z, M, d, i, j), C, d)
    @inbounds for ii in i:C, j in 1:d
        axpy_at!(G, M * (j - 1), Z[d * (ii - 1) + j], X, M * (ii - 1), M)
    end
    return G
end

# G[:, j:j+3] += X[:, i:i+3] Z[j:j+3, i:i+3]ᵀ, the 4 samples in order.
function outer_tile!(G, X, Z, M, d, i, j)
    z1, z2, z3, z4 = col4(Z, d, j, i), col4(Z, d, j, i + 1), col4(Z, d, j, i + 2), col4(Z, d, j, i + 3)
    ox = M * (i - 1)
    og = M * (j - 1)
    @inbounds @simd ivdep for m in 1:M
        x1, x2, x3, x4 = X[ox + m], X[ox + M + m], X[ox + 2M + m], X[ox + 3M + m]
        g1, g2, g3, g4 = G[og + m], G[og + M + m], G[og + 2M + m], G[og + 3M + m]
        g1, g2, g3, g4 = muladd(x1, z1[1], g1), muladd(x1, z1[2], g2), muladd(x1, z1[3], g3), muladd(x1, z1[4], g4)
        g1, g2, g3, g4 = muladd(x2, z2[1], g1), muladd(x2, z2[2], g2), muladd(x2, z2[3], g3), muladd(x2, z2[4], g4)
        g1, g2, g3, g4 = muladd(x3, z3[1], g1), muladd(x3, z3[2], g2), muladd(x3, z3[3], g3), muladd(x3, z3[4], g4)
        g1, g2, g3, g4 = muladd(x4, z4[1], g1), muladd(x4, z4[2], g2), muladd(x4, z4[3], g3), muladd(x4, z4[4], g4)
        G[og + m], G[og + M + m], G[og + 2M + m], G[og + 3M + m] = g1, g2, g3, g4
    end
    return nothing
end

# G[:, j] += X[:, i:i+3] Z[j, i:i+3], the 4 samples in order.
function outer_row!(G, X, Z, M, d, i, j)
    @inbounds a1, a2, a3, a4 = Z[d * (i - 1) + j], Z[d * i + j], Z[d * (i + 1) + j], Z[d * (i + 2) + j]
    ox, og = M * (i - 1), M * (j - 1)
    @inbounds @simd ivdep for m in 1:M
        g = muladd(X[ox + m], a1, G[og + m])
        g = muladd(X[ox + M + m], a2, g)
        g = muladd(X[ox + 2M + m], a3, g)
        G[og + m] = muladd(X[ox + 3M + m], a4, g)
    end
    return nothing
end
