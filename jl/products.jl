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
# is summed in a fixed order that depends on the shapes and, for `mul_short!`, on whether
# Julia's code has 512-bit vectors (`WIDE_VECTORS`), never on the thread count;
# `mul_tall!` and `mul_outer!` add their terms one at a time in index order, as a scalar
# loop would.

"""
    transpose_layers!(At, A)

`At[:, :, l] = A[:, :, l]ᵀ` for every layer: `(d, M, L)` into `(M, d, L)`, in blocks of
64 particles, so that `At` is written in contiguous runs while the block's columns of `A`
stay in L1 cache.
"""
function transpose_layers!(At::AbstractArray{T,3}, A::AbstractArray{T,3}) where {T}
    d, M, L = size(A)
    @inbounds for l in 1:L, m0 in 1:64:M, j in 1:d, m in m0:min(m0 + 63, M)
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
X: M × C; Y: d × C); β = 0 ignores Y's old values. The sums run 2 samples × 4 rows at a
time (8 sums in one pass over m). With AVX-512 (`WIDE_VECTORS`) and from M = `LANES_MIN_M`
on, each sum over m is split into `SUM_LANES` partial sums (the terms m ≡ k mod 8 of the
first M − M % 8, k = 1..8), added in a fixed tree (`lanes_total`), then the last M % 8
terms in order: every element in the same order. Otherwise the loop is left to `@simd`.
"""
function mul_short!(Y, At, X, α, β)
    M = size(At, 1)
    return WIDE_VECTORS && M >= LANES_MIN_M ? short_tiles!(short_tile!, short_one!, Y, At, X, α, β) :
           short_tiles!(short_tile_simd!, short_one_simd!, Y, At, X, α, β)
end

# mul_short! by `tile!` (2 samples × 4 rows) and `one!` (one element, for the rest).
function short_tiles!(tile!::F, one!::G, Y, At, X, α, β) where {F,G}
    M, d = size(At, 1), size(At, 2)
    C = size(X, 2)
    C2 = C - C % 2
    j = 1
    while j + 3 <= d  # rows outermost: At's 4 columns stay in L1 cache (X is read d/4 times)
        for i in 1:2:C2
            tile!(Y, At, X, α, β, M, d, i, j)
        end
        j += 4
    end
    for jj in j:d, ii in 1:C2
        one!(Y, At, X, α, β, M, d, ii, jj)
    end
    for ii in (C2 + 1):C, jj in 1:d
        one!(Y, At, X, α, β, M, d, ii, jj)
    end
    return Y
end

# `mul_short!` splits its sums into lanes from this M on (at M = 16 the lanes' tree made a
# short product 1.4× slower, from M = 32 on they were as fast or faster)...
const LANES_MIN_M = 32

# ... and only where Julia's code has 512-bit vectors (AVX-512). With 256-bit ones (-C
# haswell) a tile's 8 vectors of partial sums took more registers than there are, and the
# step ran 0.95× as fast at the large size. From the CPU Julia compiles for: its -C option
# (a name, with +avx512f or -avx512f heeded), else this CPU (`Sys.CPU_NAME`); an unknown
# name keeps the `@simd` loop. A wrong guess costs speed only: both forms are exact to
# their documented order.
const AVX512_CPUS = ("skylake-avx512", "skx", "cascadelake", "cooperlake", "cannonlake", "icelake-client",
                     "icelake-server", "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids",
                     "graniterapids", "graniterapids-d", "diamondrapids", "znver4", "znver5", "x86-64-v4")

"""
    cpu_target() -> String

The code generator's target: Julia's -C option as given ("haswell", ...), or "native".
"""
function cpu_target()
    opt = Base.JLOptions().cpu_target
    return opt == C_NULL ? "native" : unsafe_string(opt)
end

function wide_vectors()
    words = split(split(cpu_target(), ';')[1], ',')  # the first target: a CPU, then ±features
    cpu = words[1] == "native" ? Sys.CPU_NAME : words[1]
    return (cpu in AVX512_CPUS || "+avx512f" in words) && !("-avx512f" in words)
end

const WIDE_VECTORS = wide_vectors()

@inline function set_short!(Y, α, β, k, s)
    @inbounds Y[k] = iszero(β) ? α * s : muladd(α, s, β * Y[k])
    return nothing
end

# The partial sums of the sums over m, as one vector of 8 (one 512-bit or two 256-bit
# registers of Float64). LLVM 9 (Julia 1.5) vectorises a loop of 8 scalar sums across the
# sums, with separate multiplies and adds; these vectors keep the 8 partial sums of each sum
# in one register and use `llvm.fmuladd` (fused where the CPU has FMA, as `muladd`): at
# (M, d, C) = (512, 16, 64), 59 GFLOP/s on one core against 39.
const SUM_LANES = 8
const Lanes{T} = NTuple{SUM_LANES,VecElement{T}}

@inline lanes_zero(::Type{T}) where {T} = ntuple(_ -> VecElement(zero(T)), Val(SUM_LANES))

# A[o+1 : o+8] as a vector (written out: @inbounds does not reach into a closure)
@inline lanes_load(A, o) = @inbounds (VecElement(A[o + 1]), VecElement(A[o + 2]), VecElement(A[o + 3]),
                                      VecElement(A[o + 4]), VecElement(A[o + 5]), VecElement(A[o + 6]),
                                      VecElement(A[o + 7]), VecElement(A[o + 8]))

@inline lanes_muladd(a::Lanes{Float64}, b::Lanes{Float64}, c::Lanes{Float64}) =
    ccall("llvm.fmuladd.v8f64", llvmcall, Lanes{Float64}, (Lanes{Float64}, Lanes{Float64}, Lanes{Float64}), a, b, c)
@inline lanes_muladd(a::Lanes{Float32}, b::Lanes{Float32}, c::Lanes{Float32}) =
    ccall("llvm.fmuladd.v8f32", llvmcall, Lanes{Float32}, (Lanes{Float32}, Lanes{Float32}, Lanes{Float32}), a, b, c)
@inline lanes_muladd(a::Lanes, b::Lanes, c::Lanes) = ntuple(k -> VecElement(muladd(a[k].value, b[k].value, c[k].value)), Val(SUM_LANES))

# The lanes of s summed in a fixed tree, ((s1 + s5) + (s3 + s7)) + ((s2 + s6) + (s4 + s8)).
@inline lanes_total(s::Lanes) = ((s[1].value + s[5].value) + (s[3].value + s[7].value)) +
                                ((s[2].value + s[6].value) + (s[4].value + s[8].value))

# t + the terms m in m1:M of the sum over m of A[oa + m] X[ox + m], in order.
@inline function add_terms(t, A, oa, X, ox, m1, M)
    @inbounds for m in m1:M
        t = muladd(A[oa + m], X[ox + m], t)
    end
    return t
end

# Shuffles of two vectors of 8 (`lanes_total` of 8 vectors at once, in `lanes_totals`).
for (T, t) in ((Float64, "double"), (Float32, "float"))
    for (name, idx) in ((:lanes_lo4, (0, 1, 2, 3, 8, 9, 10, 11)), (:lanes_hi4, (4, 5, 6, 7, 12, 13, 14, 15)),
                        (:lanes_lo2, (0, 1, 8, 9, 4, 5, 12, 13)), (:lanes_hi2, (2, 3, 10, 11, 6, 7, 14, 15)),
                        (:lanes_lo1, (0, 8, 2, 10, 4, 12, 6, 14)), (:lanes_hi1, (1, 9, 3, 11, 5, 13, 7, 15)))
        mask = join(("i32 $i" for i in idx), ", ")
        ir = "%3 = shufflevector <8 x $t> %0, <8 x $t> %1, <8 x i32> <$mask>\nret <8 x $t> %3"
        @eval @inline $name(a::Lanes{$T}, b::Lanes{$T}) = Base.llvmcall($ir, Lanes{$T}, Tuple{Lanes{$T},Lanes{$T}}, a, b)
    end
    ir = "%3 = fadd <8 x $t> %0, %1\nret <8 x $t> %3"
    @eval @inline lanes_add(a::Lanes{$T}, b::Lanes{$T}) = Base.llvmcall($ir, Lanes{$T}, Tuple{Lanes{$T},Lanes{$T}}, a, b)
end

# lanes_total of a, b, c, d, e, f, g, h at once: the vector of their 8 totals in the order
# (a, e, c, g, b, f, d, h), each summed in lanes_total's tree.
@inline function lanes_totals(a::Lanes{T}, b, c, d, e, f, g, h) where {T<:Union{Float32,Float64}}
    ab, cd = lanes_add(lanes_lo4(a, b), lanes_hi4(a, b)), lanes_add(lanes_lo4(c, d), lanes_hi4(c, d))
    ef, gh = lanes_add(lanes_lo4(e, f), lanes_hi4(e, f)), lanes_add(lanes_lo4(g, h), lanes_hi4(g, h))
    abcd, efgh = lanes_add(lanes_lo2(ab, cd), lanes_hi2(ab, cd)), lanes_add(lanes_lo2(ef, gh), lanes_hi2(ef, gh))
    return lanes_add(lanes_lo1(abcd, efgh), lanes_hi1(abcd, efgh))
end
@inline function lanes_totals(a::Lanes, b, c, d, e, f, g, h)
    t = (lanes_total(a), lanes_total(e), lanes_total(c), lanes_total(g), lanes_total(b), lanes_total(f), lanes_total(d), lanes_total(h))
    return ntuple(k -> VecElement(t[k]), Val(SUM_LANES))
end

# Y[j:j+3, i:i+1] from the 8 sums over m.
function short_tile!(Y, At, X, α, β, M, d, i, j)
    T = eltype(Y)
    ox1, ox2 = M * (i - 1), M * i
    oa = M * (j - 1)
    M8 = M - M % SUM_LANES
    s11 = s12 = s13 = s14 = s21 = s22 = s23 = s24 = lanes_zero(T)
    for m in 0:SUM_LANES:(M8 - 1)
        w1, w2, w3, w4 = lanes_load(At, oa + m), lanes_load(At, oa + M + m), lanes_load(At, oa + 2M + m), lanes_load(At, oa + 3M + m)
        x = lanes_load(X, ox1 + m)
        s11, s12, s13, s14 = lanes_muladd(w1, x, s11), lanes_muladd(w2, x, s12), lanes_muladd(w3, x, s13), lanes_muladd(w4, x, s14)
        x = lanes_load(X, ox2 + m)
        s21, s22, s23, s24 = lanes_muladd(w1, x, s21), lanes_muladd(w2, x, s22), lanes_muladd(w3, x, s23), lanes_muladd(w4, x, s24)
    end
    t = lanes_totals(s11, s12, s13, s14, s21, s22, s23, s24)  # order (s11, s21, s13, s23, s12, s22, s14, s24)
    k1, k2 = d * (i - 1) + j, d * i + j
    m1 = M8 + 1
    set_short!(Y, α, β, k1, add_terms(t[1].value, At, oa, X, ox1, m1, M))
    set_short!(Y, α, β, k2, add_terms(t[2].value, At, oa, X, ox2, m1, M))
    set_short!(Y, α, β, k1 + 2, add_terms(t[3].value, At, oa + 2M, X, ox1, m1, M))
    set_short!(Y, α, β, k2 + 2, add_terms(t[4].value, At, oa + 2M, X, ox2, m1, M))
    set_short!(Y, α, β, k1 + 1, add_terms(t[5].value, At, oa + M, X, ox1, m1, M))
    set_short!(Y, α, β, k2 + 1, add_terms(t[6].value, At, oa + M, X, ox2, m1, M))
    set_short!(Y, α, β, k1 + 3, add_terms(t[7].value, At, oa + 3M, X, ox1, m1, M))
    set_short!(Y, α, β, k2 + 3, add_terms(t[8].value, At, oa + 3M, X, ox2, m1, M))
    return nothing
end

# Y[j, i] alone, in the same order as in a tile.
function short_one!(Y, At, X, α, β, M, d, i, j)
    ox, oa = M * (i - 1), M * (j - 1)
    M8 = M - M % SUM_LANES
    s = lanes_zero(eltype(Y))
    for m in 0:SUM_LANES:(M8 - 1)
        s = lanes_muladd(lanes_load(At, oa + m), lanes_load(X, ox + m), s)
    end
    set_short!(Y, α, β, d * (i - 1) + j, add_terms(lanes_total(s), At, oa, X, ox, M8 + 1, M))
    return nothing
end

# Y[j:j+3, i:i+1] from the 8 sums over m, the loop left to `@simd` (M < LANES_MIN_M).
function short_tile_simd!(Y, At, X, α, β, M, d, i, j)
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

# Y[j, i] alone, the loop left to `@simd` (M < LANES_MIN_M).
function short_one_simd!(Y, At, X, α, β, M, d, i, j)
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
