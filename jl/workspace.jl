"""
    Workspace(U, X; threaded = U isa Array)

Buffers for one problem size and element type, allocated once and reused by
`loss_and_grad!` and `gd!`: states `Z (d, N, L+1)`, `S = σ(q)` and `D = σ′(q)`
`(M, N, L)`, one layer's scratch, the residual `r (N,)` and the gradient
`gU, gW (d, M, L)`, `gb (M, L)`, and per-chunk partial gradients for the threaded path. Array types follow `U` (a `CuArray` gives GPU
buffers). `threaded=false` (the default for non-`Array` types) selects the generic,
broadcast-only path. With more than one Julia thread, the threaded path sets BLAS to
one thread, since it runs its own blocks in parallel.
"""
struct Workspace{T<:AbstractFloat,A3<:AbstractArray{T,3},A2<:AbstractArray{T,2},A1<:AbstractArray{T,1}}
    Z::A3
    S::A3
    D::A3
    Q::A2
    Tm::A2
    P::A2
    Pn::A2
    r::A1
    gU::A3
    gW::A3
    gb::A2
    ones_N::A1
    chunks::Vector{UnitRange{Int}}
    gUp::A3
    gWp::A3
    gbp::A2
    threaded::Bool
end

"""
Samples per chunk of the threaded adjoint: the parameter gradients are summed per
chunk (in cache, by the task that owns it) and the chunk sums are added in chunk
order, so the result does not depend on how chunks are spread over threads.
"""
const CHUNK = 128

function Workspace(U::AbstractArray{T,3}, X::AbstractMatrix{T}; threaded::Bool = U isa Array) where {T<:AbstractFloat}
    d, M, L = size(U)
    N = size(X, 2)
    size(X, 1) == d || throw(DimensionMismatch("X has $(size(X, 1)) rows, U has d = $d"))
    Z = similar(U, d, N, L + 1)
    S = similar(U, M, N, L)
    D = similar(U, M, N, L)
    gb = similar(U, M, L)
    chunks = [i:min(i + CHUNK - 1, N) for i in 1:CHUNK:N]
    nch = threaded ? length(chunks) : 0
    if threaded && Threads.nthreads() > 1
        # the kernels run one task per block, each calling BLAS: a multithreaded BLAS
        # would oversubscribe the cores (its threads spin between calls)
        BLAS.set_num_threads(1)
    end
    return Workspace(Z, S, D, similar(U, M, N), similar(U, M, N), similar(U, d, N), similar(U, d, N),
                     similar(U, N), similar(U), similar(U), gb, fill!(similar(U, N), one(T)),
                     chunks, similar(U, d, M, nch), similar(U, d, M, nch), similar(U, M, nch), threaded)
end

fits(ws::Workspace, U, X) =
    typeof(ws.gU) == typeof(U) && size(ws.gU) == size(U) && size(ws.Z, 2) == size(X, 2)
