# Activations σ and σ′, evaluated together (the forward pass keeps both).
# The formulas are those of pyfront/mfres/activations.py, term for term, so that the
# two backends agree to rounding.

"""
    Activation{name}

An activation of MODEL.md: `:tanh`, `:sigmoid`, `:softplus`, `:gelu` (tanh form),
`:srelu` (regularised ReLU of width `eta`) or `:relu2`.
"""
struct Activation{name}
    eta::Float64
end

const ACTIVATIONS = (:tanh, :sigmoid, :softplus, :gelu, :srelu, :relu2)

"""
    activation(name::Symbol; eta=0.5) -> Activation

The activation called `name`; `eta` is the width of `:srelu`.
"""
function activation(name::Symbol; eta::Real = 0.5)
    name in ACTIVATIONS || throw(ArgumentError("unknown activation $name; use one of $(ACTIVATIONS)"))
    (isfinite(eta) && eta > 0) || throw(ArgumentError("srelu width eta must be positive, got $eta"))
    return Activation{name}(Float64(eta))
end

const GELU_C = sqrt(2 / pi)
const GELU_A = 0.044715

"""
    value_and_derivative(σ::Activation, q) -> (σ(q), σ′(q))
"""
@inline function value_and_derivative(::Activation{:tanh}, q::T) where {T<:AbstractFloat}
    s = tanh(q)
    return s, one(T) - s * s
end

@inline function value_and_derivative(::Activation{:sigmoid}, q::T) where {T<:AbstractFloat}
    s = (tanh(q * T(0.5)) + one(T)) * T(0.5)
    return s, (one(T) - s) * s
end

@inline function value_and_derivative(::Activation{:softplus}, q::T) where {T<:AbstractFloat}
    ds = (tanh(q * T(0.5)) + one(T)) * T(0.5)
    s = log1p(exp(-abs(q))) + max(q, zero(T))
    return s, ds
end

@inline function value_and_derivative(::Activation{:gelu}, q::T) where {T<:AbstractFloat}
    q2 = q * q
    t = tanh((q2 * T(GELU_A) + one(T)) * q * T(GELU_C))
    k = (q2 * T(3 * GELU_A) + one(T)) * T(GELU_C)
    ds = ((one(T) - t * t) * k * q + t + one(T)) * T(0.5)
    s = (t + one(T)) * q * T(0.5)
    return s, ds
end

@inline function value_and_derivative(σ::Activation{:srelu}, q::T) where {T<:AbstractFloat}
    eta = T(σ.eta)
    c = clamp(q, -eta, eta) + eta
    s = q > eta ? q : c * c * (one(T) / (4 * eta))
    return s, c * (one(T) / (2 * eta))
end

@inline function value_and_derivative(::Activation{:relu2}, q::T) where {T<:AbstractFloat}
    c = max(q, zero(T))
    return c * c, c * 2
end

# Separate value and derivative, for broadcasting on any array type (the generic path).
struct Value{A<:Activation}
    act::A
end
struct Derivative{A<:Activation}
    act::A
end
@inline (f::Value)(q) = value_and_derivative(f.act, q)[1]
@inline (f::Derivative)(q) = value_and_derivative(f.act, q)[2]
