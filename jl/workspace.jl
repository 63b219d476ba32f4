"""
    Workspace(U, X; threaded = U isa Array, memory = :store)

Buffers for one problem size and element type, allocated once and reused by
`loss_and_grad!` and `gd!`. Array types follow `U` (a `CuArray` gives GPU buffers).

- `memory = :store` keeps the activations of every layer, `S = σ(q)` and (for
  activations whose σ′ is not a function of σ, see `derivative_from_value`) `D = σ′(q)`,
  `(M, N, L)` each; `memory = :recompute` keeps only the states `Z (d, N, L+1)` and one
  layer's `S`, `D` `(M, N, 1)`, recomputing a layer's activations in the adjoint
  (O(L·N·d + M·N) memory, the same numbers).
- `threaded = true` (CPU `Array`s) selects the chunked kernels: fixed sample chunks
  (`chunk_size`, a function of N, M and d only), spread over the Julia threads; the
  results are bitwise the same whatever the thread count, since BLAS is kept at one
  thread and every sum is taken in chunk order. `threaded = false` (the default for
  other array types) selects the generic path: whole-layer `mul!` and broadcasting.

Also held: the adjoint `P (d, N)` and its update `Pn`, the scratch `Tm` (`(M, N)`; on
the chunked path one chunk's `(M, C)` for each task a region can run, min(threads,
chunks)), the
residual `r (N,)`, the gradient `gU, gW (d, M, L)`, `gb (M, L)`, and per-chunk partial
gradients (two layers' worth) for the chunked path, `gUp`, `gWp` transposed `(M, d, nchunks,
2)`, and the layers' weights transposed, `Ut, Wt (M, d, L)`, for the chunked path's own
products (products.jl).
"""
mutable struct Workspace{T<:AbstractFloat,A3<:AbstractArray{T,3},A2<:AbstractArray{T,2},A1<:AbstractArray{T,1},
                         AP<:AbstractArray{Tuple{T,T},2}}
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
    chunks::Vector{UnitRange{Int}}
    gUp::Array{T,4}
    gWp::Array{T,4}
    gbp::Array{T,3}
    SD::AP
    Ut::Array{T,3}
    Wt::Array{T,3}
    threaded::Bool
    memory::Symbol
    parallel_regions::Int  # how many regions ran on several threads (for tests)
end

const MEMORY_MODES = (:store, :recompute)

"""
    chunk_size(N, M, d) -> C

Samples per chunk of the chunked kernels, from the problem size only (never from the
thread count, so that the results are the same on any number of threads). Below the
parallel threshold (N·M·d < `PARALLEL_WORK`, always run serially) one chunk, the
fewest matrix-product calls; above it about N/4, so that up to 4 threads have work, at
least 32 samples (smaller chunks cost more per sample in the products); in both cases at
most what keeps a chunk's `M × C` activations within 1 MiB of Float64.
"""
function chunk_size(N::Integer, M::Integer, d::Integer)
    cmax = clamp(prevpow(2, max(1, 131072 ÷ max(M, 1))), 32, 512)
    N * M * d < PARALLEL_WORK && return max(1, min(N, cmax))
    return clamp(cld(N, 4), 32, cmax)
end

function Workspace(U::AbstractArray{T,3}, X::AbstractMatrix{T}; threaded::Bool = U isa Array,
                   memory::Symbol = :store) where {T<:AbstractFloat}
    memory in MEMORY_MODES || throw(ArgumentError("memory must be one of $(MEMORY_MODES), got $memory"))
    d, M, L = size(U)
    N = size(X, 2)
    size(X, 1) == d || throw(DimensionMismatch("X has $(size(X, 1)) rows, U has d = $d"))
    threaded && !(U isa Array) && throw(ArgumentError("the chunked kernels need CPU Arrays; use threaded = false"))
    threaded && serial_blas!()
    Ls = memory === :store ? L : 1
    C = chunk_size(N, M, d)
    chunks = [i:min(i + C - 1, N) for i in 1:C:N]
    nch = threaded ? length(chunks) : 0
    ntm = threaded ? C * min(Threads.nthreads(), nch) : N
    return Workspace(similar(U, d, N, L + 1), similar(U, M, N, Ls), similar(U, 0, 0, 0),
                     similar(U, threaded ? 0 : M, threaded ? 0 : N), similar(U, M, ntm),
                     similar(U, d, N), similar(U, d, N), similar(U, N), similar(U), similar(U), similar(U, M, L),
                     chunks, Array{T}(undef, M, d, nch, 2), Array{T}(undef, M, d, nch, 2), Array{T}(undef, M, nch, 2),
                     similar(U, Tuple{T,T}, 0, 0), Array{T}(undef, M, d, threaded ? L : 0),
                     Array{T}(undef, M, d, threaded ? L : 0), threaded, memory, 0)
end

"""
    fits(ws, U, X, memory = :store) -> Bool

Whether `ws` serves θ of `U`'s size and type, inputs of `X`'s size, in that memory mode.
"""
fits(ws::Workspace, U, X, memory::Symbol = :store) =
    typeof(ws.gU) == typeof(U) && size(ws.gU) == size(U) && size(ws.Z, 2) == size(X, 2) && ws.memory === memory

# σ′ is kept only for activations whose σ′ is not a function of σ: allocated at the first
# step with such an activation (and the generic path's pair buffer likewise).
function ensure_derivative_buffers!(ws::Workspace{T}, σ::Activation) where {T}
    derivative_from_value(σ) && return nothing
    if size(ws.D) != size(ws.S)
        ws.D = similar(ws.S)
    end
    if !ws.threaded && size(ws.SD) != size(ws.Q)
        ws.SD = similar(ws.Q, Tuple{T,T})
    end
    return nothing
end

# True while `advance_nets` runs nets on several Julia threads: it set BLAS to one thread
# before they started, and no thread sets it again while the others are inside BLAS.
const IN_BATCH = Ref(false)

"""
    serial_blas!()

Set BLAS to one thread. The chunked kernels run their own tasks, and a product's
last bits may depend on how BLAS splits it: one BLAS thread, in every case (also with
one Julia thread), is what makes the results independent of the thread count.
"""
function serial_blas!()
    IN_BATCH[] || BLAS.set_num_threads(1)
    return nothing
end

"""
    blas_core() -> String

The OpenBLAS kernel set in use ("Haswell", "SkylakeX", "Prescott", ...), or "unknown".
Julia 1.5 calls OpenBLAS directly, later versions through libblastrampoline.
"""
function blas_core()
    names = String[Base.libblas_name]
    if isdefined(LinearAlgebra.BLAS, :get_config)
        append!(names, [lib.libname for lib in Base.invokelatest(LinearAlgebra.BLAS.get_config).loaded_libs])
    end
    for name in names, sym in (:openblas_get_corename64_, :openblas_get_corename)
        handle = Libdl.dlopen(name, throw_error = false)
        handle === nothing && continue
        f = Libdl.dlsym(handle, sym, throw_error = false)
        # the name is a static string in OpenBLAS: the pointer stays valid
        f === nothing || return Base.unsafe_string(ccall(f, Cstring, ()))
    end
    return "unknown"
end
