# Test suite of the Julia kernels: julia --project=. jl/test/runtests.jl
#
# With MFRES_CONFORMANCE_DIR set, also checks the cases that pytest wrote there
# (inputs and the NumPy backend's results) against these kernels.

using LinearAlgebra
using Random
using Test
using InteractiveUtils: code_llvm

include(joinpath(@__DIR__, "..", "MFRes.jl"))
using .MFRes
include(joinpath(@__DIR__, "threadcheck.jl"))

const ACTS = (:tanh, :sigmoid, :softplus, :gelu, :srelu, :relu2)

# A plain, loop-by-loop transcription of docs/model.md (one sample, one particle at a
# time), independent of the matrix kernels.
function plain_loss_and_grad(U, W, b, X, y, a, σ; weight_decay = 0.0)
    d, M, L = size(U)
    N = size(X, 2)
    h = 1 / L
    gU, gW, gb = zero(U), zero(W), zero(b)
    E = 0.0
    for i in 1:N
        zs = [X[:, i]]
        for l in 1:L
            z = zs[end]
            dz = zeros(d)
            for m in 1:M
                s, _ = MFRes.value_and_derivative(σ, dot(W[:, m, l], z) + b[m, l])
                dz .+= U[:, m, l] .* s
            end
            push!(zs, z .+ (h / M) .* dz)
        end
        r = dot(a, zs[end]) - y[i]
        E += 0.5 * r^2 / N
        p = r .* a
        for l in L:-1:1
            z = zs[l]
            pn = copy(p)
            for m in 1:M
                s, ds = MFRes.value_and_derivative(σ, dot(W[:, m, l], z) + b[m, l])
                up = dot(U[:, m, l], p)
                gU[:, m, l] .+= (h / M / N) .* s .* p
                gW[:, m, l] .+= (h / M / N) .* ds .* up .* z
                gb[m, l] += (h / M / N) * ds * up
                pn .+= (h / M) .* W[:, m, l] .* (ds * up)
            end
            p = pn
        end
    end
    λ = weight_decay
    E += 0.5 * λ * (sum(abs2, U) + sum(abs2, W) + sum(abs2, b)) / (L * M)
    gU .+= λ / (L * M) .* U
    gW .+= λ / (L * M) .* W
    gb .+= λ / (L * M) .* b
    return E, gU, gW, gb
end

function random_problem(rng, d, M, L, N; T = Float64)
    U = T.(randn(rng, d, M, L))
    W = T.(randn(rng, d, M, L))
    b = T.(randn(rng, M, L))
    X = T.(randn(rng, d, N))
    y = T.(sin.(2 .* vec(sum(X; dims = 1))))
    a = T.(fill(1 / sqrt(d), d))
    return U, W, b, X, y, a
end

# The reference for `mul_tall!` (Y = At Z) and `mul_outer!` (G = X Zᵀ = X (Zᵀ)): each
# element summed term by term in index order. A function, not loops in a test set's body:
# there `muladd` gave unfused sums (Julia 1.5.3, nested test sets), unlike the kernels.
function inorder_product(A, B)
    Y = zeros(size(A, 1), size(B, 2))
    for i in axes(B, 2), m in axes(A, 1)
        s = A[m, 1] * B[1, i]
        for j in 2:size(B, 1)
            s = muladd(A[m, j], B[j, i], s)
        end
        Y[m, i] = s
    end
    return Y
end

relerr(x, y) = norm(x .- y) / max(norm(y), eps(Float64))

# `mul_short!`'s Atᵀ X in lanes, in the order its docstring gives: per element,
# 8 partial sums (terms m ≡ k mod 8 of the first M − M % 8), a fixed tree, then the last terms.
function lanes_product(At, X)
    M = size(At, 1)
    M8 = M - M % 8
    Y = zeros(size(At, 2), size(X, 2))
    for i in axes(X, 2), j in axes(At, 2)
        s = zeros(8)
        for m in 1:M8
            k = (m - 1) % 8 + 1
            s[k] = muladd(At[m, j], X[m, i], s[k])
        end
        t = ((s[1] + s[5]) + (s[3] + s[7])) + ((s[2] + s[6]) + (s[4] + s[8]))
        for m in (M8 + 1):M
            t = muladd(At[m, j], X[m, i], t)
        end
        Y[j, i] = t
    end
    return Y
end


@testset "MFRes kernels" begin
    @testset "gradient = central finite differences ($act)" for act in ACTS
        rng = MersenneTwister(1)
        U, W, b, X, y, a = random_problem(rng, 3, 4, 3, 5)
        for λ in (0.0, 0.3)
            E, gU, gW, gb = MFRes.loss_and_grad(U, W, b, X, y, a; activation = act, eta = 0.7, weight_decay = λ)
            @test E ≈ MFRes.loss(U, W, b, X, y, a; activation = act, eta = 0.7, weight_decay = λ) rtol = 1e-14
            h = 1e-6
            for (θ, g) in ((U, gU), (W, gW), (b, gb))
                fd = similar(g)
                for j in eachindex(θ)
                    old = θ[j]
                    θ[j] = old + h
                    Ep = MFRes.loss(U, W, b, X, y, a; activation = act, eta = 0.7, weight_decay = λ)
                    θ[j] = old - h
                    Em = MFRes.loss(U, W, b, X, y, a; activation = act, eta = 0.7, weight_decay = λ)
                    θ[j] = old
                    fd[j] = (Ep - Em) / (2h)
                end
                @test maximum(abs.(fd .- g)) < 1e-5 * maximum(abs.(g)) + 2e-9
            end
        end
    end

    @testset "gradient = plain loop transcription of docs/model.md ($act)" for act in ACTS
        rng = MersenneTwister(2)
        U, W, b, X, y, a = random_problem(rng, 2, 5, 4, 6)
        σ = MFRes.activation(act; eta = 0.7)
        E, gU, gW, gb = MFRes.loss_and_grad(U, W, b, X, y, a; activation = act, eta = 0.7, weight_decay = 0.1)
        Er, gUr, gWr, gbr = plain_loss_and_grad(U, W, b, X, y, a, σ; weight_decay = 0.1)
        @test E ≈ Er rtol = 1e-13
        @test relerr(gU, gUr) < 1e-12
        @test relerr(gW, gWr) < 1e-12
        @test relerr(gb, gbr) < 1e-12
    end

    @testset "gd! = plain GD on the plain gradient" begin
        rng = MersenneTwister(3)
        U, W, b, X, y, a = random_problem(rng, 3, 6, 5, 8)
        L, M, Δs, n = 5, 6, 0.4, 12
        Ur, Wr, br = copy(U), copy(W), copy(b)
        losses = MFRes.gd!(U, W, b, X, y, a, Δs, n; activation = :gelu, weight_decay = 0.05)
        @test length(losses) == n + 1
        σ = MFRes.activation(:gelu)
        ref = Float64[]
        for k in 0:n
            E, gU, gW, gb = plain_loss_and_grad(Ur, Wr, br, X, y, a, σ; weight_decay = 0.05)
            push!(ref, E)
            k == n && break
            Ur .-= Δs * L * M .* gU
            Wr .-= Δs * L * M .* gW
            br .-= Δs * L * M .* gb
        end
        @test maximum(abs.(losses .- ref) ./ ref) < 1e-11
        @test relerr(U, Ur) < 1e-11 && relerr(W, Wr) < 1e-11 && relerr(b, br) < 1e-11
    end

    @testset "energy decreases for small Δs" begin
        rng = MersenneTwister(4)
        U, W, b, X, y, a = random_problem(rng, 3, 16, 8, 16)
        losses = MFRes.gd!(U, W, b, X, y, a, 0.05, 100)
        @test all(diff(losses) .<= 1e-15)
        @test losses[end] < 0.7 * losses[1]
    end

    @testset "generic (broadcast, fused) path = chunked path, above the parallel threshold ($act)" for act in ACTS
        rng = MersenneTwister(5)
        U, W, b, X, y, a = random_problem(rng, 4, 64, 3, 300)  # N M d = 76800 ≥ PARALLEL_WORK
        @test size(X, 2) * size(U, 2) * size(U, 1) >= MFRes.PARALLEL_WORK
        σ = MFRes.activation(act; eta = 0.7)
        for memory in (:store, :recompute)
            w1 = MFRes.Workspace(U, X; threaded = true, memory = memory)
            w2 = MFRes.Workspace(U, X; threaded = false, memory = memory)
            E1 = MFRes.loss_and_grad!(w1, U, W, b, X, y, a, σ; weight_decay = 0.1)
            E2 = MFRes.loss_and_grad!(w2, U, W, b, X, y, a, σ; weight_decay = 0.1)
            @test (w1.parallel_regions > 0) == (Threads.nthreads() > 1)  # really the threaded path
            @test w2.parallel_regions == 0
            @test E1 ≈ E2 rtol = 1e-14
            @test relerr(w1.gU, w2.gU) < 1e-13 && relerr(w1.gW, w2.gW) < 1e-13 && relerr(w1.gb, w2.gb) < 1e-13
            @test relerr(w1.P, w2.P) < 1e-13
        end
    end

    @testset "recompute = store to 1e-14 ($act, $(threaded ? "chunked" : "generic"))" for act in ACTS,
                                                                                            threaded in (true, false)
        rng = MersenneTwister(10)
        U, W, b, X, y, a = random_problem(rng, 3, 40, 5, 200)
        σ = MFRes.activation(act; eta = 0.7)
        ws = MFRes.Workspace(U, X; threaded = threaded, memory = :store)
        wr = MFRes.Workspace(U, X; threaded = threaded, memory = :recompute)
        @test size(wr.S) == (40, 200, 1) && size(ws.S) == (40, 200, 5)
        Es = MFRes.loss_and_grad!(ws, U, W, b, X, y, a, σ; weight_decay = 0.05)
        Er = MFRes.loss_and_grad!(wr, U, W, b, X, y, a, σ; weight_decay = 0.05)
        # σ′ is kept (one layer's worth when recomputing) only where it is not a function of σ
        @test size(wr.D, 3) == (MFRes.derivative_from_value(σ) ? 0 : 1)
        @test size(ws.D, 3) == (MFRes.derivative_from_value(σ) ? 0 : 5)
        @test abs(Es - Er) <= 1e-14 * abs(Es)
        @test relerr(wr.gU, ws.gU) <= 1e-14 && relerr(wr.gW, ws.gW) <= 1e-14 && relerr(wr.gb, ws.gb) <= 1e-14
        @test wr.Z == ws.Z
        # and along a trajectory
        Δs = act == :relu2 ? 0.01 : 0.3  # relu2 is unbounded: a stable step
        l1 = MFRes.gd!(copy(U), copy(W), copy(b), X, y, a, Δs, 5; activation = act, eta = 0.7, memory = :store)
        l2 = MFRes.gd!(copy(U), copy(W), copy(b), X, y, a, Δs, 5; activation = act, eta = 0.7, memory = :recompute)
        @test all(isfinite, l1) && l1[end] < l1[1]
        @test maximum(abs.(l1 .- l2) ./ l1) <= 1e-14
        @test_throws ArgumentError MFRes.Workspace(U, X; memory = :auto)
        @test MFRes.fits(wr, U, X, :recompute) && !MFRes.fits(wr, U, X, :store)
    end

    @testset "Float64 kernels: tanh within 3 ulp of tanh" begin
        xs = [range(-25, 25; length = 40_001); 10.0 .^ range(-12, 1.4; length = 4001);
              [0.0, 1e-300, 5e-324, 22.0, 30.0, -100.0, 0.3465735902799726, 0.34657359027997264];
              # the table form's rounding points k/128 ± 1/256 and its clip at 20
              [k / 128 + e / 256 for k in -2570:2570 for e in (-1, 1)]; prevfloat(20.0); nextfloat(20.0)]
        worst = worst_table = 0.0
        for x in xs
            ref = tanh(big(x))
            worst = max(worst, Float64(abs(MFRes.fast_tanh(x) - ref) / eps(Float64(ref))))
            worst_table = max(worst_table, Float64(abs(MFRes.table_tanh(x) - ref) / eps(Float64(ref))))
        end
        println("fast_tanh(Float64): worst error $worst ulp; table_tanh: $worst_table ulp")
        @test worst <= 3 && worst_table <= 3
        for th in (MFRes.fast_tanh, MFRes.table_tanh)
            @test signbit(th(-0.0)) && !signbit(th(0.0)) && th(Inf) == 1.0 && th(-Inf) == -1.0 && isnan(th(NaN))
            @test th(-0.7) == -th(0.7) && th(20.5) == 1.0 && th(-1e6) == -1.0
        end
        # the CPU loops' tanh is the table form in Float64
        @test MFRes.host_tanh(0.3) === MFRes.table_tanh(0.3) && MFRes.host_tanh(0.3f0) === MFRes.fast_tanh(0.3f0)
    end

    @testset "Float32 kernels: tanh within 3 ulp of tanh, never through Float64" begin
        xs = Float32[range(-12, 12; length = 40_001); [0.0f0, -0.0f0, 1.0f-30, -1.0f-20, 1.0f-6, 9.0f0, 30.0f0, -100.0f0]]
        worst = 0.0
        for x in xs
            t = MFRes.fast_tanh(x)
            @test t isa Float32
            ref = tanh(big(x))
            worst = max(worst, Float64(abs(t - ref) / eps(Float32(ref))))
        end
        println("fast_tanh(Float32): worst error $worst ulp")
        @test worst <= 3
        @test signbit(MFRes.fast_tanh(-0.0f0))
        # the Float32 kernel's code has no Float64 arithmetic
        code = sprint(code_llvm, MFRes.tanh_kernel, Tuple{Float32})
        @test !occursin("double", code)
    end

    @testset "Float32 = Float64 to float32 precision ($act)" for act in ACTS
        rng = MersenneTwister(6)
        U, W, b, X, y, a = random_problem(rng, 4, 64, 4, 300)
        U32, W32, b32, X32, y32, a32 = map(v -> Float32.(v), (U, W, b, X, y, a))
        for threaded in (true, false)
            σ = MFRes.activation(act; eta = 0.7)
            w64 = MFRes.Workspace(U, X; threaded = threaded)
            w32 = MFRes.Workspace(U32, X32; threaded = threaded)
            E64 = MFRes.loss_and_grad!(w64, U, W, b, X, y, a, σ)
            E32 = MFRes.loss_and_grad!(w32, U32, W32, b32, X32, y32, a32, σ)
            @test eltype(w32.gU) == Float32
            @test abs(E32 - E64) < 1e-4 * E64
            @test relerr(w32.gU, w64.gU) < 1e-4 && relerr(w32.gW, w64.gW) < 1e-4 && relerr(w32.gb, w64.gb) < 1e-4
        end
        Δs = act == :relu2 ? 0.01 : 0.5
        l64 = MFRes.gd!(U, W, b, X, y, a, Δs, 30; activation = act, eta = 0.7)
        l32 = MFRes.gd!(U32, W32, b32, X32, y32, a32, Δs, 30; activation = act, eta = 0.7)
        @test all(isfinite, l64) && l64[end] < l64[1]
        @test maximum(abs.(l32 .- l64) ./ l64) < 1e-4
    end

    @testset "a step allocates no arrays: a fixed number of bytes, whatever N, M and the step count" begin
        function bytes_per_step(d, M, L, N)
            U, W, b, X, y, a = random_problem(MersenneTwister(7), d, M, L, N)
            ws = MFRes.Workspace(U, X)
            σ = MFRes.activation(:tanh)
            losses, norms = zeros(101), zeros(101)
            run(n) = MFRes.gd!(ws, U, W, b, X, y, a, 0.01, n, σ; losses = losses, norms = norms)
            run(2)
            a10 = @allocated run(10)
            a100 = @allocated run(100)
            return (a100 - a10) / 90
        end
        small = bytes_per_step(4, 64, 8, 256)  # both above the threads' work threshold
        large = bytes_per_step(4, 128, 8, 512)
        println("allocated per GD step, L = 8: $small bytes (M=64, N=256), $large bytes (M=128, N=512); ",
                "$(Threads.nthreads()) threads")
        # What remains are small wrappers (array views on Julia 1.5, the tasks of
        # Threads.@threads): a fixed amount per layer, never an array of size N or M.
        if Threads.nthreads() == 1
            @test small == large
            @test small <= 1024 * 8  # view wrappers: about half a KiB per layer
        else  # task objects and closures: a fixed count, whose size varies a little with scheduling
            @test abs(small - large) < 0.05 * small
            @test small < 16384 * 8
        end
    end

    @testset "BLAS runs on one thread inside the kernels, also with one Julia thread" begin
        blas_threads() = isdefined(BLAS, :get_num_threads) ? BLAS.get_num_threads() :
                         Int(ccall((:openblas_get_num_threads64_, Base.libblas_name), Cint, ()))
        U, W, b, X, y, a = random_problem(MersenneTwister(11), 3, 8, 2, 20)
        ws = MFRes.Workspace(U, X)
        BLAS.set_num_threads(2)
        @test blas_threads() == 2
        MFRes.loss_and_grad!(ws, U, W, b, X, y, a, MFRes.activation(:tanh))
        @test blas_threads() == 1
    end

    @testset "bitwise the same on 1 and 2 threads, threaded path taken (d=3, M=300, L=3, N=1000)" begin
        # this process against a Julia process with the other thread count (1 ↔ 2)
        other = Threads.nthreads() == 1 ? 2 : 1
        rng = MersenneTwister(8)
        U, W, b, X, y, a = random_problem(rng, 3, 300, 3, 1000)
        dir = mktempdir()
        for (name, v) in (("U", U), ("W", W), ("b", b), ("X", X), ("y", y), ("a", a))
            write(joinpath(dir, name * ".bin"), v)
        end
        run_threadcheck(dir, U, W, b, X, y, a, "here")
        script = """
            include($(repr(joinpath(@__DIR__, "..", "MFRes.jl"))))
            include($(repr(joinpath(@__DIR__, "threadcheck.jl"))))
            rd(n, dims...) = read!(joinpath($(repr(dir)), n * ".bin"), Array{Float64}(undef, dims...))
            U = rd("U", 3, 300, 3); W = rd("W", 3, 300, 3); b = rd("b", 300, 3)
            X = rd("X", 3, 1000); y = rd("y", 1000); a = rd("a", 3)
            run_threadcheck($(repr(dir)), U, W, b, X, y, a, "there")
            """
        run(`$(Base.julia_cmd()) -t $other --startup-file=no -e $script`)
        regions = Dict(tag => parse(Int, readline(joinpath(dir, "$(tag)_regions.txt"))) for tag in ("here", "there"))
        two = Threads.nthreads() == 1 ? "there" : "here"
        one_ = two == "here" ? "there" : "here"
        @test regions[two] > 0   # the 2-thread run went through the threaded regions
        @test regions[one_] == 0
        ndiff = 0
        for act in (:tanh, :softplus), memory in (:store, :recompute), f in ("Z", "S", "P", "gU", "gW", "gb", "losses", "Uf")
            key = "$(act)_$(memory)_$(f)"
            x1 = read(joinpath(dir, "here_$(key).bin"))
            x2 = read(joinpath(dir, "there_$(key).bin"))
            @test !isempty(x1)
            @test x1 == x2
            ndiff += x1 != x2
        end
        println("thread-count check: $(Threads.nthreads()) threads vs $other, $ndiff arrays differ in any bit")
    end

    @testset "chunk products = in-order scalar loops and BLAS (M=$M, d=$d, C=$C)" for M in (1, 5, 33, 47, 64, 600),
                                                                                     d in (1, 3, 4, 5, 6, 16),
                                                                                     C in (1, 3, 7, 8, 63)
        rng = MersenneTwister(M + 100d + 10000C)
        At, Z, X = randn(rng, M, d), randn(rng, d, C), randn(rng, M, C)
        # Y = At Z and G = X Zᵀ: each element summed in index order, first term a plain product
        Y, G = MFRes.mul_tall!(zeros(M, C), At, Z), MFRes.mul_outer!(fill(NaN, M, d), X, Z)
        @test Y == inorder_product(At, Z)
        @test G == inorder_product(X, permutedims(Z))  # mul_outer!'s first term, muladd(x, z, 0), is x z too
        # done!(i1, i2): every column once, in order, each call on columns already complete
        calls, complete, Yd = UnitRange{Int}[], Ref(true), zeros(M, C)
        MFRes.mul_tall!(Yd, At, Z, (i1, i2) -> (push!(calls, i1:i2); complete[] &= Yd[:, i1:i2] == Y[:, i1:i2]))
        @test reduce(vcat, collect.(calls)) == 1:C && complete[] && Yd == Y
        # Y = β Y + α Atᵀ X: the sums over m vectorised, so equal to rounding
        Y0 = randn(rng, d, C)
        tol = 16 * M * eps() * (norm(At) * norm(X) + norm(Y0))
        @test norm(MFRes.mul_short!(copy(Y0), At, X, 0.7, -0.3) - (-0.3 .* Y0 .+ 0.7 .* (At' * X))) <= tol
        @test norm(MFRes.mul_short!(fill(NaN, d, C), At, X, 0.7, 0.0) - 0.7 .* (At' * X)) <= tol
        # ... and in lanes (taken from LANES_MIN_M on, with AVX-512) in the documented order, bit
        # for bit, whether an element comes from a tile of 2 × 4 or alone
        lanes = MFRes.short_tiles!(MFRes.short_tile!, MFRes.short_one!, fill(NaN, d, C), At, X, 0.7, 0.0)
        @test lanes == 0.7 .* lanes_product(At, X)
        MFRes.WIDE_VECTORS && M >= MFRes.LANES_MIN_M && @test MFRes.mul_short!(fill(NaN, d, C), At, X, 0.7, 0.0) == lanes
    end

    @testset "transpose_layers! = permutedims (d=$d, M=$M)" for d in (1, 4, 16), M in (1, 63, 64, 65, 130)
        A = randn(MersenneTwister(d + 1000M), d, M, 3)
        @test MFRes.transpose_layers!(fill(NaN, M, d, 3), A) == permutedims(A, (2, 1, 3))
    end

    @testset "bridge entry points" begin
        rng = MersenneTwister(9)
        U, W, b, X, y, a = random_problem(rng, 3, 8, 4, 10)
        U2, W2, b2 = copy(U), copy(W), copy(b)
        losses, norms = MFRes.advance_chunk(U, W, b, X, y, a, 0.5, 7, "srelu", 0.3, 0.01)
        ref = MFRes.gd!(U2, W2, b2, X, y, a, 0.5, 7; activation = :srelu, eta = 0.3, weight_decay = 0.01)
        @test losses == ref && length(norms) == 8 && all(norms .> 0)
        @test U == U2
        # divergence stops the chunk at the first non-finite E
        losses, norms = MFRes.advance_chunk(U, W, b, X, y, a, 1e4, 500, "tanh", 0.5, 10.0)
        @test !isfinite(losses[end]) && all(isfinite, losses[1:end-1]) && length(losses) < 501
        # a batch: each net's numbers are its own run's, bit for bit (small nets: spread over the threads)
        probs = [random_problem(MersenneTwister(20 + j), 3, 8, 4, 10) for j in 1:5]
        X, y, a = probs[1][4], probs[1][5], probs[1][6]
        Us, Ws, bs = [copy(p[1]) for p in probs], [copy(p[2]) for p in probs], [copy(p[3]) for p in probs]
        L5, N5, P5 = zeros(8, 5), zeros(8, 5), zeros(10, 5)
        @test MFRes.advance_nets(Us, Ws, bs, X, y, a, 0.5, 7, "tanh", 0.5, 0.01, L5, N5; predictions = P5) == 8
        @test (MFRes.BATCH_CACHE[] !== nothing) == (Threads.nthreads() > 1)  # the nets went over the threads
        @test !MFRes.IN_BATCH[]
        for j in 1:5
            U1, W1, b1 = copy(probs[j][1]), copy(probs[j][2]), copy(probs[j][3])
            l1, n1 = MFRes.advance_chunk(U1, W1, b1, X, y, a, 0.5, 7, "tanh", 0.5, 0.01)
            zL = MFRes.cached_workspace(U1, X).Z[:, :, end]
            @test L5[:, j] == l1 && N5[:, j] == n1 && P5[:, j] == transpose(zL) * a
            @test Us[j] == U1 && Ws[j] == W1 && bs[j] == b1
        end
        @test MFRes.to_device(X, "cpu") === X
        @test_throws ArgumentError MFRes.to_device(X, "cuda")
        @test_throws ArgumentError MFRes.activation(:relu)
    end

    @testset "lane blocks: a batch vectorised across nets ($act, $memory)" for act in ("tanh", "softplus"),
                                                                               memory in ("store", "recompute")
        K = MFRes.LANES
        B = 2K + 3  # two lane blocks and three nets alone
        probs = [random_problem(MersenneTwister(40 + j), 3, 8, 4, 10) for j in 1:B]
        X, y, a = probs[1][4], probs[1][5], probs[1][6]
        function run_batch(js)
            local θ = [[copy(probs[j][v]) for j in js] for v in 1:3]
            local out = (zeros(8, length(js)), zeros(8, length(js)), zeros(10, length(js)))
            @test MFRes.advance_nets(θ..., X, y, a, 0.2, 7, act, 0.5, 0.01, out[1], out[2]; predictions = out[3],
                                     memory = memory) == 8
            return (θ..., out...)
        end
        Us, Ws, bs, Ls, Ns, Ps = run_batch(1:B)
        @test MFRes.BLOCK_CACHE[][1] isa MFRes.BatchWorkspace
        worst = 0.0
        for j in 1:B  # each net against its run alone: the same to rounding
            U1, W1, b1 = copy(probs[j][1]), copy(probs[j][2]), copy(probs[j][3])
            l1, n1 = MFRes.advance_chunk(U1, W1, b1, X, y, a, 0.2, 7, act, 0.5, 0.01; memory = memory)
            zL = MFRes.cached_workspace(U1, X, memory).Z[:, :, end]
            @test Ls[:, j] ≈ l1 rtol = 1e-13
            @test Ns[:, j] ≈ n1 rtol = 1e-12
            @test Ps[:, j] ≈ transpose(zL) * a rtol = 1e-12
            @test Us[j] ≈ U1 rtol = 1e-12
            @test Ws[j] ≈ W1 rtol = 1e-12
            @test bs[j] ≈ b1 rtol = 1e-12
            worst = max(worst, maximum(abs.(Ls[:, j] .- l1) ./ l1))
        end
        println("lane blocks ($act, $memory): worst relative difference of E from runs alone $worst")
        # a net in a block: bit for bit the same in any lane and beside any other nets
        rev = run_batch(2K:-1:1)
        for (k, j) in enumerate(2K:-1:1)
            @test rev[4][:, k] == Ls[:, j] && rev[5][:, k] == Ns[:, j] && rev[6][:, k] == Ps[:, j]
            @test rev[1][k] == Us[j] && rev[2][k] == Ws[j] && rev[3][k] == bs[j]
        end
    end

    @testset "lane blocks: a tile of four samples gives the bits of four samples one by one (d = $d, M = $M)" for
            (d, M) in ((1, 1), (1, 6), (3, 5), (4, 8), (2, 7))
        K, L, l = MFRes.LANES, 2, 2
        rng = MersenneTwister(7 + 10d + M)
        A = randn(rng, K, d, M, L)
        X = randn(rng, K, d, 4)  # four samples' d-side vectors (z or p)
        Y = randn(rng, K, M, 4)  # and their M-side ones (σ or T)
        vk, vd = Val(K), Val(d)
        # (one-sample sum, the tile's, the output's and the input's sample strides, input, output shape)
        for (one, tile, so, si, inp, shape) in
                ((MFRes.sum_rows!, (o, A, l, x) -> MFRes.sum_rows_tile!(MFRes.StoreRows{Float64,3,K}(o, 0, M), A, l, x, 0,
                                                                        vk, vd), K * M, K * d, X, (K, M, 4)),
                 (MFRes.sum_particles!, (o, A, l, y) -> MFRes.sum_particles_n!(o, 0, A, l, y, 0, 4, vk, vd), K * d,
                  K * M, Y, (K, d, 4)))
            R1, R4 = zeros(shape), zeros(shape)
            for n in 0:3
                one(R1, so * n, A, l, inp, si * n, vk, vd)
            end
            tile(R4, A, l, inp)
            @test R4 == R1
        end
        og = K * d * M * (l - 1)
        G1 = randn(rng, K, d, M, L)
        G4 = copy(G1)
        for n in 0:3
            MFRes.add_outer!(G1, og, X, K * d * n, Y, K * M * n, M, vk, vd)
        end
        MFRes.add_outer_tile!(G4, og, X, 0, Y, 0, M, vk, vd)
        @test G4 == G1
        # the adjoint's T = σ′(s) ⊙ Uᵀp and gb += T, sample after sample
        f = MFRes.DerivativeOfValue(MFRes.activation(:tanh))
        Sv = tanh.(randn(rng, K, M, 4))
        ob = K * M * (l - 1)
        gb1 = randn(rng, K, M, L)
        gb4 = copy(gb1)
        T1, T4 = zeros(K, M, 4), zeros(K, M, 4)
        for n in 0:3
            MFRes.sum_rows!(T1, K * M * n, A, l, X, K * d * n, vk, vd)
            for k in 1:(K * M)
                T1[K * M * n + k] *= f(Sv[K * M * n + k])
                gb1[ob + k] += T1[K * M * n + k]
            end
        end
        MFRes.sum_rows_tile!(MFRes.TimesDerivative{Float64,3,K,typeof(f)}(T4, 0, Sv, 0, gb4, ob, M, f), A, l, X, 0,
                             vk, vd)
        @test T4 == T1 && gb4 == gb1
    end

    conformance = get(ENV, "MFRES_CONFORMANCE_DIR", "")
    if !isempty(conformance)
        include(joinpath(@__DIR__, "conformance.jl"))
        check_conformance(conformance)
    end
end
