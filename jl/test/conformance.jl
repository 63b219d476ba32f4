# Cross-language conformance: cases written by tests/test_julia.py, each a folder with
# meta.txt (key=value) and raw little-endian arrays in Julia's layouts, which are the
# bytes of NumPy's C-order (L, M, d) arrays. Expected values are the NumPy backend's.

function read_meta(dir)
    meta = Dict{String,String}()
    for line in eachline(joinpath(dir, "meta.txt"))
        k, v = split(line, "="; limit = 2)
        meta[strip(k)] = strip(v)
    end
    return meta
end

readbin(dir, name, T, dims...) = read!(joinpath(dir, name * ".bin"), Array{T}(undef, dims...))

function check_conformance(root)
    cases = sort(filter(d -> isfile(joinpath(root, d, "meta.txt")), readdir(root)))
    @testset "conformance with the NumPy backend: $case" for case in cases
        dir = joinpath(root, case)
        m = read_meta(dir)
        T = m["dtype"] == "float32" ? Float32 : Float64
        L, M, d, N = (parse(Int, m[k]) for k in ("L", "M", "d", "N"))
        nsteps = parse(Int, m["nsteps"])
        Δs, eta, λ = (parse(Float64, m[k]) for k in ("ds", "eta", "weight_decay"))
        act = Symbol(m["activation"])
        tol = parse(Float64, m["rtol"])
        U = readbin(dir, "U", T, d, M, L)
        W = readbin(dir, "W", T, d, M, L)
        b = readbin(dir, "b", T, M, L)
        X = readbin(dir, "X", T, d, N)
        y = readbin(dir, "y", T, N)
        a = readbin(dir, "a", T, d)
        E, gU, gW, gb = MFRes.loss_and_grad(U, W, b, X, y, a; activation = act, eta = eta, weight_decay = λ)
        Eref = readbin(dir, "E", Float64, 1)[1]
        @test abs(E - Eref) <= tol * abs(Eref)
        for (g, name) in ((gU, "gU"), (gW, "gW"), (gb, "gb"))
            ref = readbin(dir, name, T, size(g)...)
            @test relerr(g, ref) <= tol
        end
        losses = MFRes.gd!(U, W, b, X, y, a, Δs, nsteps; activation = act, eta = eta, weight_decay = λ)
        lref = readbin(dir, "losses", Float64, nsteps + 1)
        worst = maximum(abs.(losses .- lref) ./ abs.(lref))
        println("conformance $case: max relative loss difference $worst over $nsteps steps")
        @test worst <= tol
        @test relerr(U, readbin(dir, "Uf", T, d, M, L)) <= tol
        @test relerr(W, readbin(dir, "Wf", T, d, M, L)) <= tol
        @test relerr(b, readbin(dir, "bf", T, M, L)) <= tol
        write(joinpath(dir, "julia_losses.bin"), losses)
    end
end
