# One side of the thread-count test of runtests.jl, run in two Julia processes (1 and 2
# threads): the kernels' arrays after a gradient and after 10 GD steps, as raw bytes.

function run_threadcheck(dir, U, W, b, X, y, a, tag)
    regions = typemax(Int)
    for act in (:tanh, :softplus), memory in (:store, :recompute)
        σ = MFRes.activation(act)
        ws = MFRes.Workspace(U, X; memory = memory)
        MFRes.loss_and_grad!(ws, U, W, b, X, y, a, σ; weight_decay = 0.01)
        key = "$(act)_$(memory)"
        for f in (:Z, :S, :P, :gU, :gW, :gb)
            write(joinpath(dir, "$(tag)_$(key)_$(f).bin"), getfield(ws, f))
        end
        Uc, Wc, bc = copy(U), copy(W), copy(b)
        losses = zeros(11)
        MFRes.gd!(ws, Uc, Wc, bc, X, y, a, 0.2, 10, σ; losses = losses)
        write(joinpath(dir, "$(tag)_$(key)_losses.bin"), losses)
        write(joinpath(dir, "$(tag)_$(key)_Uf.bin"), Uc)
        regions = min(regions, ws.parallel_regions)
    end
    write(joinpath(dir, "$(tag)_regions.txt"), string(regions))
    return nothing
end
