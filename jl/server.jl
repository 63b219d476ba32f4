# The Julia side of the executable transport (pyfront/mfres/backends/julia_exe.py):
#
#     julia [-t N] [-C CPU] --startup-file=no jl/server.jl
#
# One request per line on stdin, one response per line on stdout:
#   "ok <words...>" or "error <Julia's message on one line>". Arrays never cross the
# pipe: they live in one shared file (/dev/shm or the temp dir) that Python creates
# with numpy.memmap and this server maps with Mmap. A C-order NumPy array of shape
# (n1, ..., nk) is mapped as a Julia Array of the reversed dims (nk, ..., n1): the
# same bytes, so θ (B, L, M, d) is seen as B arrays U :: (d, M, L), MFRes's layout.
#
# Requests:
#   layout PATH T L M d N B CAP oU oW ob ogU ogW ogb ox oy oa oloss onorm opred
#       map the file (T = float64 | float32; o* are byte offsets; B = 0 for one net);
#       losses and norms are (B, CAP + 1) Float64 in C order, the nets' outputs at their
#       last state (B, N) in T
#   warmup T ACT ETA [batch D]
#                           compile for one element type and activation (tiny problem):
#                           one net's path, or with "batch" a batch's for inputs of
#                           dimension D (default 2), and the requests
#                           themselves (the mapping is kept; the next advance starts afresh)
#   advance N DS ACT ETA WD MEM [continue]
#                           advance every net by N steps; "ok K S C": K values per net,
#                           S seconds in the kernels; "continue" (one net): θ is where the
#                           last advance left it, so its ∇E is still in the workspace and
#                           the first evaluation is skipped (C = 1 when that happened)
#   gradient ACT ETA WD     E and ∇E of net 1 into gU, gW, gb; "ok E"
#   device cpu|cuda         where the kernels run (cuda needs CUDA.jl for this Julia)
#   close                   "ok bye", then exit
# The first line is "ready VERSION THREADS BLAS TARGET" (BLAS: OpenBLAS's kernel set, or
# "unknown"; TARGET: the code generator's CPU, the -C option given or "native").
# The server exits at end of input, so it never outlives the pipe from its parent.

include(joinpath(@__DIR__, "MFRes.jl"))

module Server

using Mmap
import ..MFRes

mutable struct Maps
    U::Vector{Any}
    W::Vector{Any}
    b::Vector{Any}
    gU::Any
    gW::Any
    gb::Any
    X::Any
    y::Any
    a::Any
    losses::Matrix{Float64}
    norms::Matrix{Float64}
    pred::Any
    single::Bool
end

const MAPS = Ref{Any}(nothing)
const DEVICE = Ref("cpu")

eltype_of(name::AbstractString) = name == "float64" ? Float64 :
    name == "float32" ? Float32 : throw(ArgumentError("unknown element type $name"))

function layout(words)
    path = words[1]
    T = eltype_of(words[2])
    L, M, d, N, B, cap = (parse(Int, w) for w in words[3:8])
    oU, oW, ob, ogU, ogW, ogb, ox, oy, oa, oloss, onorm, opred = (parse(Int, w) for w in words[9:20])
    nets = max(B, 1)
    s = sizeof(T)
    io = open(path, "r+")
    try
        net(off, dims, j) = Mmap.mmap(io, Array{T,length(dims)}, dims, off + (j - 1) * prod(dims) * s)
        U = Any[net(oU, (d, M, L), j) for j in 1:nets]
        W = Any[net(oW, (d, M, L), j) for j in 1:nets]
        b = Any[net(ob, (M, L), j) for j in 1:nets]
        maps = Maps(U, W, b, Mmap.mmap(io, Array{T,3}, (d, M, L), ogU),
                    Mmap.mmap(io, Array{T,3}, (d, M, L), ogW), Mmap.mmap(io, Array{T,2}, (M, L), ogb),
                    Mmap.mmap(io, Array{T,2}, (d, N), ox), Mmap.mmap(io, Array{T,1}, (N,), oy),
                    Mmap.mmap(io, Array{T,1}, (d,), oa),
                    Mmap.mmap(io, Matrix{Float64}, (cap + 1, nets), oloss),
                    Mmap.mmap(io, Matrix{Float64}, (cap + 1, nets), onorm),
                    Mmap.mmap(io, Matrix{T}, (N, nets), opred), B == 0)
        MAPS[] = maps
    finally
        close(io)  # the mappings stay valid after the file is closed (and unlinked)
    end
    return "ok"
end

maps() = MAPS[] === nothing ? error("no shared arrays mapped yet (send layout first)") : MAPS[]::Maps

# θ and the data where the kernels run: the shared arrays themselves on the CPU,
# device copies (moved back after the call) on a GPU.
on_device(x) = DEVICE[] == "cpu" ? x : Base.invokelatest(MFRes.to_device, x, DEVICE[])
back!(dst, src) = dst === src ? dst : copyto!(dst, Base.invokelatest(MFRes.host_array, src))

# (E, velocity, (activation, eta, λ, memory)) of the single net where the last `advance`
# left it, while the cached workspace still holds ∇E there; any other request clears it
# (see `serve`).
const LAST = Ref{Any}(nothing)

# "ACT ETA WD [MEMORY]" -> (activation, eta, λ, memory), Strings rather than the SubStrings
# of `split`: the types `warmup` compiled for
function problem_options(words)
    return (String(words[1]), parse(Float64, words[2]), parse(Float64, words[3]),
            length(words) >= 4 ? String(words[4]) : "store")
end

function advance(words)
    m = maps()
    n = parse(Int, words[1])
    Δs = parse(Float64, words[2])
    key = problem_options(words[3:min(end, 6)])
    act, eta, wd, memory = key
    last = LAST[]
    LAST[] = nothing
    start = length(words) >= 7 && words[7] == "continue" && m.single && last !== nothing && last[3] == key ?
            (last[1], last[2]) : nothing
    n + 1 <= size(m.losses, 1) || error("$n steps do not fit the shared loss buffer ($(size(m.losses, 1) - 1))")
    X, y, a = on_device(m.X), on_device(m.y), on_device(m.a)
    Us, Ws, bs = map(on_device, m.U), map(on_device, m.W), map(on_device, m.b)
    t0 = time_ns()
    k = Base.invokelatest(MFRes.advance_nets, Us, Ws, bs, X, y, a, Δs, n, act, eta, wd,
                          view(m.losses, 1:n+1, :), view(m.norms, 1:n+1, :); stop_nonfinite = m.single,
                          memory = memory, predictions = m.pred, start = start)
    seconds = (time_ns() - t0) / 1e9
    foreach(back!, m.U, Us)
    foreach(back!, m.W, Ws)
    foreach(back!, m.b, bs)
    if m.single && k == n + 1
        LAST[] = (m.losses[k, 1], m.norms[k, 1], key)
    end
    return "ok $k $seconds $(start === nothing ? 0 : 1)"
end

function gradient(words)
    m = maps()
    act, eta, wd, memory = problem_options(words)
    E, gU, gW, gb = Base.invokelatest(MFRes.gradient, on_device(m.U[1]), on_device(m.W[1]), on_device(m.b[1]),
                                      on_device(m.X), on_device(m.y), on_device(m.a), act, eta, wd;
                                      memory = memory)
    copyto!(m.gU, MFRes.host_array(gU))
    copyto!(m.gW, MFRes.host_array(gW))
    copyto!(m.gb, MFRes.host_array(gb))
    return "ok $(repr(Float64(E)))"
end

# Compile the kernels for one element type and activation on a tiny problem, so
# that the first chunk's time is the kernels' and start-up is measured apart. "batch":
# the path of a batch of nets instead, for inputs of dimension D (the lane blocks'
# kernels are compiled for each d), compiled only when a batch is first asked for, so
# that one net's start-up never pays it.
function warmup(words)
    T = eltype_of(words[1])
    act, eta = String(words[2]), parse(Float64, words[3])
    batch = length(words) >= 4 && words[4] == "batch"
    warm_requests(T, act, eta)
    M, L, N = 3, 2, 4
    d = batch && length(words) >= 5 ? parse(Int, words[5]) : 2  # lane blocks are compiled per d
    U, W, b = fill(T(0.1), d, M, L), fill(T(-0.2), d, M, L), fill(T(0.05), M, L)
    X, y, a = fill(T(0.3), d, N), fill(T(0.5), N), fill(T(1), d)
    # the argument types of `advance`'s call (its `map`s give concretely typed vectors)
    if batch
        B = MFRes.LANES + 1  # a lane block and a net alone
        U2, W2, b2 = (map(on_device, Any[copy(v) for _ in 1:B]) for v in (U, W, b))
        losses2, norms2, pred2 = zeros(2, B), zeros(2, B), zeros(T, N, B)
        Base.invokelatest(MFRes.advance_nets, U2, W2, b2, X, y, a, 0.01, 1, act, eta, 0.0,
                          view(losses2, 1:2, :), view(norms2, 1:2, :); stop_nonfinite = false, memory = "store",
                          predictions = pred2, start = nothing)
        return "ok"
    end
    losses, norms, pred = zeros(2, 1), zeros(2, 1), zeros(T, N, 1)
    Us, Ws, bs = map(on_device, Any[U]), map(on_device, Any[W]), map(on_device, Any[b])
    for start in (nothing, (0.0, 0.0))  # afresh and from a previous chunk
        Base.invokelatest(MFRes.advance_nets, Us, Ws, bs, X, y, a, 0.01, 1, act, eta, 0.0,
                          view(losses, 1:2, :), view(norms, 1:2, :); stop_nonfinite = true, memory = "store",
                          predictions = pred, start = start)
    end
    Base.invokelatest(MFRes.gradient, U, W, b, X, y, a, act, eta, 0.0)
    return "ok"
end

# The requests themselves (`layout`, `advance` afresh and continued, `gradient`), on a tiny
# file of this server's own: compiling them costs a few tenths of a second, which would
# otherwise land in a run's first chunk and count as stepping. The caller's mapping is
# kept; its next `advance` starts afresh (the cached workspace now holds the tiny problem).
function warm_requests(T, act, eta)
    d, M, L, N, cap = 2, 3, 2, 4, 2
    counts = (d * M * L, d * M * L, M * L, d * M * L, d * M * L, M * L, d * N, N, d)
    offsets = cumsum([0; [c * sizeof(T) for c in counts]; (cap + 1) * 8; (cap + 1) * 8])
    saved = MAPS[]
    path, io = mktemp()
    try
        write(io, zeros(UInt8, offsets[end] + N * sizeof(T)))
        close(io)
        lines = ("layout $path $(T == Float64 ? "float64" : "float32") $L $M $d $N 0 $cap " * join(offsets, " "),
                 "advance 1 0.01 $act $eta 0.0 store", "advance 1 0.01 $act $eta 0.0 store continue",
                 "gradient $act $eta 0.0 store")
        for line in lines
            words = split(line)
            HANDLERS[words[1]](words[2:end])
        end
    finally
        MAPS[], LAST[] = saved, nothing
        isopen(io) && close(io)
        rm(path; force = true)
    end
    return nothing
end

function device(words)
    dev = words[1]
    if dev == "cuda" && DEVICE[] != "cuda"
        Base.find_package("CUDA") === nothing &&
            error("CUDA.jl is not installed for this Julia ($(Sys.BINDIR)); install it with " *
                  "`julia -e 'using Pkg; Pkg.add(\"CUDA\")'` or use --device cpu")
        Core.eval(Main, :(using CUDA))
        cuda = Core.eval(Main, :CUDA)
        Base.invokelatest(cuda.functional) || error("CUDA.jl loaded but reports no usable GPU (CUDA.functional() is false)")
        Base.invokelatest(MFRes.use_cuda!, cuda)
    elseif dev != "cpu" && dev != "cuda"
        error("unknown device $dev")
    end
    DEVICE[] = dev
    return "ok"
end

const HANDLERS = Dict{String,Function}("layout" => layout, "advance" => advance, "gradient" => gradient,
                                       "warmup" => warmup, "device" => device)

one_line(s) = replace(strip(s), r"\s*\n\s*" => " | ")

function respond(out::IO, line::AbstractString)
    println(out, line)
    flush(out)
end

function serve(input::IO = stdin, out::IO = stdout)
    respond(out, "ready $(VERSION) $(Threads.nthreads()) $(MFRes.blas_core()) $(MFRes.cpu_target())")
    while !eof(input)
        words = split(readline(input))
        isempty(words) && continue
        cmd = words[1]
        if cmd == "close"
            respond(out, "ok bye")
            return
        end
        cmd == "advance" || (LAST[] = nothing)
        reply = try
            haskey(HANDLERS, cmd) || error("unknown request $cmd")
            HANDLERS[cmd](words[2:end])
        catch e
            "error " * one_line(sprint(showerror, e))
        end
        respond(out, reply)
    end
    return
end

end # module

Server.serve()
