# Activations σ and σ′, evaluated together (the forward pass keeps both).
# The formulas are those of pyfront/mfres/activations.py, term for term, so that the
# two backends agree to rounding.

"""
    Activation{name}

An activation of docs/model.md: `:tanh`, `:sigmoid`, `:softplus`, `:gelu` (tanh form),
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

# tanh that vectorises. Julia's Base.tanh is a scalar routine (table lookups and
# branches, ~20 ns an element); the activations dominate a GD step at large sizes, so
# the kernels use branch-free forms, accurate to a few ulp (tested against BigFloat in
# runtests.jl): on the CPU in Float64 the table form below (`table_tanh`), elsewhere
# (Float32, and the generic path that also runs on GPUs) this one, from arithmetic alone:
#   tanh(x) = sign(x) e/(e + 2),  e = expm1(2|x|) = 2^k (expm1(r) + 1) − 1,
# with 2|x| = k ln2 + r, |r| ≤ ln2/2, and expm1(r) by its Taylor polynomial to r^14/14!
# (evaluated by Estrin's scheme).
const LN2_HI = 6.93147180369123816490e-01
const LN2_LO = 1.90821492927058770002e-10
const INV_LN2 = 1.44269504088896338700e+00
const ROUND_MAGIC = 6.755399441055744e15  # 1.5 * 2^52: x + M − M rounds x to an integer

@inline function tanh_kernel(x::Float64)
    y = 2 * min(abs(x), 22.0)  # tanh(22) == 1.0 in Float64; keeps 2^k in range
    k = (y * INV_LN2 + ROUND_MAGIC) - ROUND_MAGIC
    r = muladd(-k, LN2_LO, muladd(-k, LN2_HI, y))
    # expm1(r) = r + r² Σ_{n=0}^{12} rⁿ/(n+2)!, the sum by Estrin's scheme (pairs of terms, then
    # pairs of pairs in r², r⁴, r⁸): four dependent fused steps instead of Horner's twelve, so
    # that the vector units are not left waiting on one long chain (1.3-1.6x per element)
    r2 = r * r
    r4 = r2 * r2
    q0 = muladd(1 / 6, r, 0.5)
    q1 = muladd(1 / 120, r, 1 / 24)
    q2 = muladd(1 / 5040, r, 1 / 720)
    q3 = muladd(1 / 362880, r, 1 / 40320)
    q4 = muladd(1 / 39916800, r, 1 / 3628800)
    q5 = muladd(1 / 6227020800, r, 1 / 479001600)
    w1 = muladd(muladd(q3, r2, q2), r4, muladd(q1, r2, q0))
    w2 = muladd(1 / 87178291200, r4, muladd(q5, r2, q4))
    p = muladd(w2, r4 * r4, w1)
    em1r = muladd(p * r, r, r)  # expm1(r)
    # 2^k from the integer in the low mantissa bits of k + magic (k + 1023 < 2^11)
    twok = reinterpret(Float64, reinterpret(Int64, k + (ROUND_MAGIC + 1023)) << 52)
    e = muladd(twok, em1r, twok - 1)
    return copysign(e / (e + 2), x)
end

# The same scheme in Float32, with its own constants: tanh(9) == 1f0, |r| ≤ ln2/2 and
# expm1(r) to r^8/8! (truncation below 0.1 ulp); 2^k from the low bits of k + magic.
const LN2_HI_F32 = 0.693145751953125f0   # ln 2 with the low 12 bits of the mantissa zero
const LN2_LO_F32 = 1.4286068f-6
const INV_LN2_F32 = 1.442695f0
const ROUND_MAGIC_F32 = 1.2582912f7       # 1.5 * 2^23

@inline function tanh_kernel(x::Float32)
    y = 2 * min(abs(x), 9.0f0)
    k = (y * INV_LN2_F32 + ROUND_MAGIC_F32) - ROUND_MAGIC_F32
    r = muladd(-k, LN2_LO_F32, muladd(-k, LN2_HI_F32, y))
    p = Float32(1 / 40320)
    p = muladd(p, r, Float32(1 / 5040))
    p = muladd(p, r, Float32(1 / 720))
    p = muladd(p, r, Float32(1 / 120))
    p = muladd(p, r, Float32(1 / 24))
    p = muladd(p, r, Float32(1 / 6))
    p = muladd(p, r, 0.5f0)
    em1r = muladd(p * r, r, r)  # expm1(r)
    twok = reinterpret(Float32, reinterpret(Int32, k + (ROUND_MAGIC_F32 + 127.0f0)) << 23)
    e = muladd(twok, em1r, twok - 1)
    return copysign(e / (e + 2), x)
end

# tanh from a table, on the CPU (no table can be read inside a GPU kernel): the formula of
# pyfront/mfres/activations.py. x is rounded to the nearest multiple k h of h = 1/128 (by
# adding and removing a constant whose last place is h), u = x − k h exactly (|u| ≤ 1/256),
# and tanh(x) = (tanh u + c_k) / (1 + c_k tanh u) with c_k = tanh(k h) from the table and
# tanh u = A/B, A = u (15 + u²), B = 15 + 6 u² (the [3/2] Padé approximant): one division,
# no polynomial of high degree (0.86 against 1.14 ns per element, skylake-avx512 code; 0.94
# against 1.55 with AVX2, 1.37 against 2.42 with AVX only: AMD EPYC Zen 4, one core). The
# table holds n_k = −c_k with n_0 = +0.0, so that tanh(−0) = −0; beyond |x| = 20 tanh
# rounds to ±1 and the input is clipped there (and c_k = ±1).
const TANH_STEPS = 128
const TANH_XMAX = 20
const TANH_K = TANH_STEPS * TANH_XMAX
const TANH_MAGIC = 1.5 * 2.0^52 / TANH_STEPS
const TANH_OFFSET = reinterpret(Int64, TANH_MAGIC) - TANH_K
# each entry correctly rounded (BigFloat at 256 bits whatever the session's precision), built
# when the module loads (~40 ms)
const TANH_TABLE = setprecision(BigFloat, 256) do
    [k == 0 ? 0.0 : Float64(-tanh(BigFloat(k) / TANH_STEPS)) for k in -TANH_K:TANH_K]
end

@inline function table_tanh(x::Float64)
    xc = clamp(x, -Float64(TANH_XMAX), Float64(TANH_XMAX))  # NaN stays NaN
    f = xc + TANH_MAGIC
    # k + K, 0-based; the clamp keeps a NaN's index (its bits) inside the table
    k = clamp(reinterpret(Int64, f) - TANH_OFFSET, 0, 2 * TANH_K)
    u = xc - (f - TANH_MAGIC)
    n = @inbounds TANH_TABLE[k + 1]
    z = u * u
    A = (z + 15.0) * u
    B = z * 6.0 + 15.0
    return (A - n * B) / (B - n * A)
end

"""
    host_tanh(x)

tanh as the CPU loops evaluate it: the table form (`table_tanh`) in Float64, the
polynomial (`fast_tanh`) in Float32; within 3 ulp of `tanh`.
"""
@inline host_tanh(x::Float64) = table_tanh(x)
@inline host_tanh(x::AbstractFloat) = fast_tanh(x)

"""
    fast_tanh(x)

tanh(x) by a branch-free formula that SIMD-vectorises, within a few ulp of `tanh`;
Float64 and Float32 each have their own kernel (Float32 never goes through Float64).
"""
@inline fast_tanh(x::Float64) = tanh_kernel(x)
@inline fast_tanh(x::Float32) = tanh_kernel(x)
@inline fast_tanh(x::AbstractFloat) = tanh(x)

const GELU_C = sqrt(2 / pi)
const GELU_A = 0.044715

"""
    value_and_derivative(σ::Activation, q[, th]) -> (σ(q), σ′(q))

`th` is the tanh to build on: `fast_tanh` (the default, fit for any array type) or
`host_tanh` (CPU loops).
"""
@inline value_and_derivative(σ::Activation, q) = value_and_derivative(σ, q, fast_tanh)

@inline function value_and_derivative(::Activation{:tanh}, q::T, th::F) where {T<:AbstractFloat,F}
    s = th(q)
    return s, one(T) - s * s
end

@inline function value_and_derivative(::Activation{:sigmoid}, q::T, th::F) where {T<:AbstractFloat,F}
    s = (th(q * T(0.5)) + one(T)) * T(0.5)
    return s, (one(T) - s) * s
end

@inline function value_and_derivative(::Activation{:softplus}, q::T, th::F) where {T<:AbstractFloat,F}
    ds = (th(q * T(0.5)) + one(T)) * T(0.5)
    s = log1p(exp(-abs(q))) + max(q, zero(T))
    return s, ds
end

@inline function value_and_derivative(::Activation{:gelu}, q::T, th::F) where {T<:AbstractFloat,F}
    q2 = q * q
    t = th((q2 * T(GELU_A) + one(T)) * q * T(GELU_C))
    k = (q2 * T(3 * GELU_A) + one(T)) * T(GELU_C)
    ds = ((one(T) - t * t) * k * q + t + one(T)) * T(0.5)
    s = (t + one(T)) * q * T(0.5)
    return s, ds
end

@inline function value_and_derivative(σ::Activation{:srelu}, q::T, _) where {T<:AbstractFloat}
    eta = T(σ.eta)
    c = clamp(q, -eta, eta) + eta
    s = q > eta ? q : c * c * (one(T) / (4 * eta))
    return s, c * (one(T) / (2 * eta))
end

@inline function value_and_derivative(::Activation{:relu2}, q::T, _) where {T<:AbstractFloat}
    c = max(q, zero(T))
    return c * c, c * 2
end

"""
    derivative_from_value(σ) -> Bool

Whether σ′(q) is a function of σ(q) alone (`tanh`: 1 − s², `sigmoid`: (1 − s) s), with
the very arithmetic `value_and_derivative` uses: the kernels then keep S only and form
σ′ from it where it is needed (bitwise the same numbers, half the memory traffic).
"""
derivative_from_value(::Activation) = false
derivative_from_value(::Activation{:tanh}) = true
derivative_from_value(::Activation{:sigmoid}) = true

"""
    derivative_of_value(σ, s) -> σ′ at the point where σ = s (only if `derivative_from_value(σ)`)
"""
@inline derivative_of_value(::Activation{:tanh}, s::T) where {T<:AbstractFloat} = one(T) - s * s
@inline derivative_of_value(::Activation{:sigmoid}, s::T) where {T<:AbstractFloat} = (one(T) - s) * s

# Callables for broadcasting on any array type (the generic path): the value, the pair
# (value, derivative) from one evaluation, and σ′ from the value.
struct Value{A<:Activation}
    act::A
end
struct ValueAndDerivative{A<:Activation}
    act::A
end
struct DerivativeOfValue{A<:Activation}
    act::A
end
@inline (f::Value)(q) = value_and_derivative(f.act, q)[1]
@inline (f::ValueAndDerivative)(q) = value_and_derivative(f.act, q)
@inline (f::DerivativeOfValue)(s) = derivative_of_value(f.act, s)
