# CUDA glue, included by `MFRes.use_cuda!(CUDA)` only after `using CUDA` succeeded
# in the caller's session: never on Julia 1.5, never at load time. The kernels
# themselves are the generic path (mul! → CUBLAS, broadcasting → GPU kernels).
module CUDAGlue

import ..MFRes

const CUDA_MODULE = Ref{Module}()

MFRes.to_device(x, ::Val{:cuda}) = CUDA_MODULE[].CuArray(x)

end # module
