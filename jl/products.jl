# The chunked kernels' matrix products, as plain loops.
#
# Every product of a chunk has one dimension of size d (small: the data dimension) and
# the others M and C (the chunk's samples). On such shapes single-threaded BLAS runs far
# from its rate (at (M, d, C) = (128, 8, 64) about 10 GFLOP/s where a 2048² dgemm gives
# 40–60), while these loops, with the particle index m innermost and contiguous, ran
# 1.2–2× faster than BLAS at the chunk shapes of the medium and large benchmark sizes,
# 0.9–2× at the small one (benchmarks/julia_products.jl, Julia 1.5.3, AMD EPYC). They
# need the layer's weights as M × d matrices (`transpose_layers!`). Each output element
# is summed in a fixed order, so the results do not depend on the thread count either.

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

# Y[oy .+ (1:n)] += a X[ox .+ (1:n)]: the inner loop of `mul_tall!` and `mul_outer!`.
@inline function axpy_at!(Y, oy, a, X, ox, n)
    @inbounds @simd ivdep for m in 1:n
        Y[oy + m] = muladd(X[ox + m], a, Y[oy + m])
    end
    return nothing
end

# Y = At Z, i.e. Y[:, i] = Σ_j At[:, j] Z[j, i]   (At: M × d; Y: M × C; Z: d × C).
function mul_tall!(Y, At, Z)
    M, d = size(At, 1), size(At, 2)
    @inbounds for i in 1:size(Z, 2)
        oy = M * (i - 1)
        oz = d * (i - 1)
        z1 = Z[oz + 1]
        @simd ivdep for m in 1:M
            Y[oy + m] = At[m] * z1
        end
        for j in 2:d
            axpy_at!(Y, oy, Z[oz + j], At, M * (j - 1), M)
        end
    end
    return Y
end

# Y = β Y + α Atᵀ X, i.e. Y[j, i] = β Y[j, i] + α Σ_m At[m, j] X[m, i]
# (At: M × d; X: M × C; Y: d × C); β = 0 ignores Y's old values.
function mul_short!(Y, At, X, α, β)
    M, d = size(At, 1), size(At, 2)
    @inbounds for i in 1:size(X, 2)
        ox = M * (i - 1)
        for j in 1:d
            oa = M * (j - 1)
            s = zero(eltype(Y))
            @simd for m in 1:M
                s = muladd(At[oa + m], X[ox + m], s)
            end
            k = d * (i - 1) + j
            Y[k] = iszero(β) ? α * s : muladd(α, s, β * Y[k])
        end
    end
    return Y
end

# G = X Zᵀ, i.e. G[:, j] = Σ_i X[:, i] Z[j, i]   (X: M × C; Z: d × C; G: M × d).
function mul_outer!(G, X, Z)
    M, d = size(X, 1), size(Z, 1)
    fill!(G, zero(eltype(G)))
    @inbounds for i in 1:size(X, 2), j in 1:d
        axpy_at!(G, M * (j - 1), Z[d * (i - 1) + j], X, M * (i - 1), M)
    end
    return G
end
