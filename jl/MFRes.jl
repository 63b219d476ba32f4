"""
    MFRes

Kernels of mfres: the finite mean-field ResNet of docs/model.md (forward pass, discrete
adjoint, gradient) and its particle gradient flow, on Julia arrays.

Layouts are column-major and equal to NumPy's C-order `(L, M, d)` memory:
`U, W :: (d, M, L)`, `b :: (M, L)`, `X :: (d, N)`, `y :: (N,)`, `a :: (d,)`.
Depth step `h = 1/L`; a GD step of pseudo-time `Δs` is `θ ← θ − Δs L M ∇E`.

Uses Base and the standard library only, and runs on Julia 1.5 and ≥ 1.10.
"""
module MFRes

using LinearAlgebra
using Libdl
using Random

export loss_and_grad, loss_and_grad!, gd!, Workspace, activation, loss

include("activations.jl")
include("workspace.jl")
include("products.jl")
include("kernels.jl")
include("batch.jl")
include("flow.jl")
include("bridge.jl")

"""
    use_cuda!(cuda::Module)

Load the CUDA glue (`cuda.jl`), given the `CUDA` module of a session where
`using CUDA` has succeeded; afterwards `to_device(x, "cuda")` gives `CuArray`s.
"""
function use_cuda!(cuda::Module)
    isdefined(MFRes, :CUDAGlue) || Base.include(MFRes, joinpath(@__DIR__, "cuda.jl"))
    # the include defines CUDAGlue in a newer world than this running call: on
    # Julia ≥ 1.12 only invokelatest sees the new binding
    Base.invokelatest(set_cuda_module!, cuda)
    return nothing
end

set_cuda_module!(cuda::Module) = (getfield(MFRes, :CUDAGlue).CUDA_MODULE[] = cuda; nothing)

end # module
