# The particle gradient flow: GD steps θ ← θ − Δs L M ∇E.

"""
    velocity_rms(ws) -> Float64

RMS over the L M particles of the velocity |dθ/ds| = L M |∇_θ E| (2d+1 components each),
for the gradient held in `ws`.
"""
function velocity_rms(ws::Workspace)
    M, L = size(ws.gU, 2), size(ws.gU, 3)
    sq = Float64(sumsq(ws.gU)) + Float64(sumsq(ws.gW)) + Float64(sumsq(ws.gb))
    return L * M * sqrt(sq / (L * M))
end

"""
    gd!(ws, U, W, b, X, y, a, Δs, nsteps, σ; weight_decay=0.0, losses, norms, stop_nonfinite=false,
        start=nothing) -> k

Advance θ = (U, W, b) in place by `nsteps` GD steps of pseudo-time `Δs` on the
preallocated workspace `ws`. Writes E before each step and after the last into
`losses[1:nsteps+1]`, and the RMS particle velocity at the same points into `norms`
(if given). With `stop_nonfinite`, stops at the first non-finite E, leaving θ at
the state that produced it. Returns the number of values written.
`start = (E, v)`: `ws` already holds ∇E at this θ (the end of the previous call, on the
same data), with E and velocity v; the first evaluation is skipped (n evaluations for n
steps, the same numbers).
"""
function gd!(ws::Workspace{T}, U, W, b, X, y, a, Δs::Real, nsteps::Integer, σ::Activation;
             weight_decay::Real = 0.0, losses::AbstractVector{Float64},
             norms::Union{Nothing,AbstractVector{Float64}} = nothing,
             stop_nonfinite::Bool = false, start::Union{Nothing,Tuple{Float64,Float64}} = nothing) where {T}
    M, L = size(U, 2), size(U, 3)
    length(losses) > nsteps || throw(DimensionMismatch("losses needs nsteps + 1 = $(nsteps + 1) entries"))
    step = T(Δs * L * M)
    for k in 0:nsteps
        if k == 0 && start !== nothing
            E = start[1]
            norms === nothing || (norms[1] = start[2])
        else
            E = loss_and_grad!(ws, U, W, b, X, y, a, σ; weight_decay = weight_decay)
            norms === nothing || (norms[k + 1] = velocity_rms(ws))
        end
        losses[k + 1] = E
        (k == nsteps || (stop_nonfinite && !isfinite(E))) && return k + 1
        U .-= step .* ws.gU
        W .-= step .* ws.gW
        b .-= step .* ws.gb
    end
    return nsteps + 1
end

"""
    gd!(U, W, b, X, y, a, Δs, nsteps; activation=:tanh, eta=0.5, weight_decay=0.0, memory=:store)
        -> Vector{Float64}

Advance θ in place by `nsteps` GD steps (θ ← θ − Δs L M ∇E) and return the
`nsteps + 1` values of E (before each step and after the last). `memory` is the
workspace's mode (`:store` or `:recompute`, see `Workspace`).
"""
function gd!(U, W, b, X, y, a, Δs::Real, nsteps::Integer; activation::Symbol = :tanh, eta::Real = 0.5,
             weight_decay::Real = 0.0, memory::Symbol = :store)
    ws = Workspace(U, X; memory = memory)
    losses = Vector{Float64}(undef, nsteps + 1)
    gd!(ws, U, W, b, X, y, a, Δs, nsteps, MFRes.activation(activation; eta = eta);
        weight_decay = weight_decay, losses = losses)
    return losses
end
