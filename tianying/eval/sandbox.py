"""Run untrusted generated code (HumanEval samples) isolated by the kernel, not by Python.

Each program runs in a fresh Python (`-I -S -B`, stdlib only) inside its own user*/PID/network/mount/IPC/UTS
namespaces, made by bubblewrap (`bwrap`) where it is installed and by util-linux `unshare` otherwise; with
neither, `run_python` refuses (`SandboxUnavailable`, one line) unless the caller opts out with `unsafe=True`
(`tianying eval --unsafe-exec`). (*as root no user namespace is needed: the program is switched to the real
uid `nobody` instead.)

Contained (OS-enforced; each has a test in tests/test_sandbox.py):
- user: as root, the program runs as uid/gid 65534 (`nobody`, no groups, no capabilities, no_new_privs), so
  files readable only by root or another user stay unreadable. As a non-root caller it runs as the caller
  (mapped to 65534 in a user namespace) without capabilities: it can read what the caller can *of what is
  mounted* (below);
- filesystem: a new root holding only /usr (and the /bin, /lib… links), the Python installation (read-only),
  a fresh /proc of its own PID namespace, /dev's null/zero/random devices and a private tmpfs /tmp (the working
  directory, bounded in size). Home directories, /etc, /work, /root, the caller's /tmp are not there at all;
- processes: PID 1 of its own PID namespace is bwrap's init (with unshare: the runner itself); the program
  sees only its own processes
  (no other process's argv or environment), cannot signal the evaluator, and every process it starts — a
  `setsid` daemon included — dies with the namespace when the program ends or is killed (wall clock:
  SIGKILL of the whole namespace);
- network: its own network namespace with only a down loopback: no connections anywhere;
- rlimits: CPU seconds, address space, processes (RLIMIT_NPROC: a fork bomb stops there), file size, open
  files, no core dumps; the environment is built from scratch (no tokens or keys of the caller), stdin is
  /dev/null.

Pass/fail: `passed` only when the runner printed this run's random token to a private pipe, which it does
after the program *and* the tests ran to the end. The token reaches the runner through a file descriptor that
is read and closed before the program starts, and lives only in a local of the runner's main function;
`os._exit(0)`, `sys.exit(0)` or printing "passed" therefore fail. The tests' comparisons are rewritten to be
type-strict (`==`, `<`, `in`, … only between plain data: numbers, str, bytes, None, classes and containers of
them), and whatever `candidate(...)` returns must be plain data, so an object whose `__eq__` always returns
True (or whose arithmetic returns 0) fails. The tests run with the builtins and `sys.modules` as they were
before the program ran, so patched builtins or planted modules do not reach them.

Second layer (Python-level; it keeps honest programs honest and makes the token hard to reach, but it is not
what contains hostile code): an audit hook denies open/listdir outside the working directory and the stdlib,
writes outside it, os.system/exec/spawn/fork/kill, sockets, ctypes, and the introspection that would reach the
runner's frames or objects (sys._getframe except from a few stdlib modules such as typing,
sys._current_frames, gc.get_objects/referrers/referents, traceback→frame access, settrace/setprofile); the
program may not leave threads running before its tests.

Not contained: CPU and memory bandwidth contention with the host; the kernel itself (a kernel exploit escapes
any namespace); side channels such as timing. A program that defeats the Python-level layer (e.g. through an
interpreter bug) can forge its *own* pass — but stays inside every OS boundary above. As a non-root caller the
program can read files the caller can read under /usr and the Python installation (normally public anyway).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tianying.errors import TianyingError

NOBODY = 65534
BACKENDS = ("bwrap", "unshare")


class SandboxUnavailable(TianyingError):
    """No way to isolate generated code on this machine (and the caller did not opt out)."""


_RUNNER = r'''
def _main():
    import json, os, resource, sys
    cfg = json.loads(sys.argv[1]); sys.argv[:] = ["prog.py"]
    with os.fdopen(cfg["in_fd"], "rb") as f:
        job = json.loads(f.read())
    token, code, test = job["token"], job["code"], job["test"]
    del job
    ctl = cfg["ctl_fd"]
    os.set_inheritable(ctl, False)
    report = {"backend": cfg["backend"]}
    MB = 1 << 20
    if cfg["backend"] == "unshare":
        _new_root(cfg, report)
    elif cfg["backend"] == "bwrap":
        report["filesystem"] = "minimal read-only root (bwrap), private tmpfs /tmp"
    uid = os.geteuid()
    if uid == 0 and cfg["root"]:  # the real uid 0 outside: become nobody (drops every capability)
        os.setgroups([]); os.setresgid(cfg["nobody"], cfg["nobody"], cfg["nobody"])
        os.setresuid(cfg["nobody"], cfg["nobody"], cfg["nobody"])
        if os.getresuid() != (cfg["nobody"],) * 3 or os.getgroups():
            raise SystemExit("sandbox: could not switch to nobody")
        report["user"] = "nobody (uid 65534 on the host)"
    else:
        _drop_caps()
        report["user"] = "the caller's uid (user namespace), no capabilities"
    _no_new_privs()
    with open("/proc/self/status") as f:
        st = dict(line.split(":", 1) for line in f if ":" in line)
    if int(st["CapEff"].strip(), 16) or int(st["CapPrm"].strip(), 16) or st["NoNewPrivs"].strip() != "1":
        raise SystemExit("sandbox: capabilities still held")
    for lim, val in ((resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1)), (resource.RLIMIT_CORE, (0, 0)),
                     (resource.RLIMIT_FSIZE, (cfg["file_mb"] * MB,) * 2), (resource.RLIMIT_NOFILE, (64, 64)),
                     (resource.RLIMIT_NPROC, (cfg["processes"],) * 2),
                     (resource.RLIMIT_AS, (cfg["memory_mb"] * MB,) * 2)):
        resource.setrlimit(lim, val)
    report["namespaces"] = cfg["backend"] != "none"
    report["rlimits"] = {"cpu_s": cfg["cpu_s"], "memory_mb": cfg["memory_mb"], "file_mb": cfg["file_mb"],
                         "processes": cfg["processes"]}
    os.chdir(cfg["workdir"])
    strict, result = _strict_compare()
    clean_builtins = dict(__builtins__.__dict__ if hasattr(__builtins__, "__dict__") else __builtins__)
    try:
        test_code = compile(_rewrite(test), "test.py", "exec") if test else None
    except SyntaxError as e:
        raise SystemExit(f"sandbox: the tests do not compile: {e}")
    import _thread, types
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    g = main.__dict__
    modules = dict(sys.modules)
    if cfg["hook"]:
        _install_hook(report, cfg["workdir"])
        report["audit_hook"] = True
    write, exit_ = os.write, os._exit
    write(ctl, (json.dumps(report) + "\n").encode())
    del cfg, report, st, f, json, resource
    try:
        exec(compile(code, "prog.py", "exec"), g)
        if _thread._count():
            raise RuntimeError("sandbox: the program left threads running before its tests")
        sys.modules.clear(); sys.modules.update(modules)  # the tests import fresh copies, not planted ones
        if test_code is not None:
            t = dict(g)
            t["__builtins__"] = dict(clean_builtins)
            t["__tianying_cmp__"], t["__tianying_result__"] = strict, result
            exec(test_code, t)
        sys.stdout.flush(); sys.stderr.flush()
    except BaseException as e:
        try:
            sys.stdout.flush()
            print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            exit_(1)
    write(ctl, (token + "\n").encode())
    exit_(0)


def _libc():
    import ctypes
    return ctypes, ctypes.CDLL(None, use_errno=True)


def _no_new_privs():
    _, libc = _libc()
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary or file capability can raise privileges


def _drop_caps():
    ctypes, libc = _libc()
    class Hdr(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    for cap in range(64):  # the bounding set first (needs CAP_SETPCAP), then every set
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    if libc.capset(ctypes.byref(Hdr(0x20080522, 0)), (ctypes.c_uint32 * 6)()) != 0:
        raise SystemExit("sandbox: capset failed")


def _new_root(cfg, report):
    """unshare backend: build the same minimal read-only root that bwrap builds, then chroot into it."""
    import os
    ctypes, libc = _libc()
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
        1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
    def mount(src, dst, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
            e = ctypes.get_errno()
            raise SystemExit(f"sandbox: mount {dst}: {os.strerror(e)}")
    def ro_bind(src, dst):
        mount(src, dst, None, MS_BIND | MS_REC)
        keep = os.statvfs(dst).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)  # locked flags must be kept
        mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    R = cfg["newroot"]  # an empty host directory; the tmpfs over it exists only in this mount namespace
    mount("tmpfs", R, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    def ro_dir(name):
        old = os.umask(0o022)
        os.makedirs(R + name, mode=0o755, exist_ok=True)
        os.umask(old)
        ro_bind(name, R + name)
    for name, kind, target in cfg["layout"]:
        if kind == "symlink":
            os.symlink(target, R + name)
        elif kind == "dir":
            ro_dir(name)
    for d in ("/proc", "/dev", "/tmp"):
        os.makedirs(R + d, mode=0o755, exist_ok=True)
    mount("proc", R + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for dev in ("null", "zero", "full", "random", "urandom"):
        open(R + "/dev/" + dev, "w").close()
        mount("/dev/" + dev, R + "/dev/" + dev, None, MS_BIND)
    mount("tmpfs", R + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmp_mb']}m,mode=1777")
    for name, kind, _ in cfg["layout"]:
        if kind == "expose":
            ro_dir(name)
    os.chdir(R)
    os.chroot(".")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    report["filesystem"] = "minimal read-only root (chroot), private tmpfs /tmp"


def _strict_compare():
    """`__tianying_cmp__(a, op, b)`: a comparison of the tests, allowed only between plain data, and
    `__tianying_result__(v)`: what a call of `candidate(...)` (HumanEval's name for the function under test)
    returned, which must be plain data too (an object with arithmetic that yields 0 would pass `abs(x - y) < e`)."""
    import operator
    ops = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
           ">=": operator.ge, "in": lambda a, b: a in b, "not in": lambda a, b: a not in b}
    scalars = (int, float, complex, bool, str, bytes, type(None), type)  # type: classes of a plain metaclass
    seqs = (list, tuple, set, frozenset)
    _type, _id, _len = type, id, len
    def plain(x):
        todo, seen = [x], set()
        while todo:
            v = todo.pop()
            t = _type(v)
            if t in scalars:
                continue
            if _id(v) in seen:
                continue
            seen.add(_id(v))
            if t in seqs:
                todo.extend(v)
            elif t is dict:
                todo.extend(v.keys()); todo.extend(v.values())
            else:
                return False
            if _len(seen) > 1_000_000:
                return False
        return True
    def cmp(a, op, b):
        if not (plain(a) and plain(b)):
            bad = a if not plain(a) else b
            raise AssertionError(f"sandbox: the tests compare a {_type(bad).__name__}, not plain data")
        return ops[op](a, b)
    def result(v):
        if not plain(v):
            raise AssertionError(f"sandbox: the candidate returned a {_type(v).__name__}, not plain data")
        return v
    return cmp, result


def _rewrite(src):
    """The tests with every comparison `a OP b` turned into `__tianying_cmp__(a, 'OP', b)` and every
    `candidate(...)` into `__tianying_result__(candidate(...))`."""
    import ast
    names = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
             ast.In: "in", ast.NotIn: "not in"}
    class T(ast.NodeTransformer):
        def visit_Call(self, node):
            self.generic_visit(node)
            if isinstance(node.func, ast.Name) and node.func.id == "candidate":
                return ast.copy_location(ast.Call(ast.Name("__tianying_result__", ast.Load()), [node], []), node)
            return node
        def visit_Compare(self, node):
            self.generic_visit(node)
            if len(node.ops) != 1 or type(node.ops[0]) not in names:
                return node
            call = ast.Call(ast.Name("__tianying_cmp__", ast.Load()),
                            [node.left, ast.Constant(names[type(node.ops[0])]), node.comparators[0]], [])
            return ast.copy_location(call, node)
    tree = ast.fix_missing_locations(T().visit(ast.parse(src)))
    return tree


def _install_hook(report, workdir):
    import os, sys
    real = os.path.realpath
    read_roots = tuple(real(p) for p in [workdir] + [p for p in sys.path if p])
    write_roots = (real(workdir),)
    def inside(path, roots):
        if isinstance(path, int):
            return True  # a descriptor it already has (tempfile, os.pipe); the token is in none of them
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        p = real(os.path.join(os.getcwd(), os.fspath(path)))
        return p in ("/dev/null", "/dev/urandom") or any(p == r or p.startswith(r + os.sep) for r in roots)
    DENY = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
            "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__", "socket.connect",
            "socket.bind", "socket.sendto", "socket.getaddrinfo", "os.setuid", "os.setgid",
            "sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
            "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook"}
    FRAME_ATTRS = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"}
    PATH_WRITE = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                  "os.chown", "os.truncate", "os.utime", "os.mkfifo", "os.mknod", "shutil.rmtree",
                  "shutil.copyfile", "shutil.move", "os.removexattr", "os.setxattr"}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    deny = PermissionError
    # sys._getframe hands out a frame, and f_back (not audited) leads from any frame to the runner's: only
    # these stdlib modules may call it (they read the caller's module name and never return the frame)
    lib = real(os.path.dirname(os.__file__))
    FRAME_USERS = {os.path.join(lib, f) for f in ("typing.py", "collections/__init__.py", "enum.py",
                                                  "dataclasses.py", "functools.py", "warnings.py", "abc.py")}
    getframe, ident, busy = sys._getframe, __import__("_thread").get_ident, set()
    def caller_may_getframe():
        me = ident()
        if me in busy:  # the hook's own call below
            return True
        busy.add(me)
        try:
            return getframe(2).f_code.co_filename in FRAME_USERS
        finally:
            busy.discard(me)
    def hook(event, args):
        if event == "sys._getframe" and not caller_may_getframe():
            raise deny("sandbox: sys._getframe is not allowed")
        if event in DENY or event.startswith("ctypes."):
            raise deny(f"sandbox: {event} is not allowed")
        if event == "object.__getattr__" and args[1] in FRAME_ATTRS:
            raise deny(f"sandbox: .{args[1]} is not allowed")
        if event == "import" and args[0].split(".")[0] in ("ctypes", "_ctypes", "_posixsubprocess"):
            raise deny(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") or (mode is None and (flags or 0) & WRITE_FLAGS)
            if not inside(path, write_roots if writes else read_roots):
                raise deny(f"sandbox: open({path!r}, {mode!r}) outside the sandbox directory")
        elif event in ("os.listdir", "os.scandir", "os.chdir"):
            if args and args[0] is not None and not inside(args[0], read_roots):
                raise deny(f"sandbox: {event}({args[0]!r}) outside the sandbox directory")
        elif event in PATH_WRITE:
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not inside(a, write_roots):
                    raise deny(f"sandbox: {event}({a!r}) outside the sandbox directory")
    import socket
    def no_net(*a, **k):
        raise PermissionError("network access is disabled in the sandbox")
    socket.socket = socket.create_connection = socket.socketpair = no_net
    sys.addaudithook(hook)


_main()
'''


@dataclass
class Limits:
    """Per-sample limits; the defaults suit HumanEval (its tests run in well under a second)."""

    timeout_s: float = 10.0
    cpu_s: int | None = None  # default: the wall-clock timeout, rounded up
    memory_mb: int = 1024
    file_mb: int = 16  # largest file; /tmp holds at most 4× this
    processes: int = 16  # RLIMIT_NPROC
    max_output: int = 16_000  # characters of stdout/stderr kept per stream


@dataclass
class SandboxResult:
    status: str  # "passed", "failed", "timeout" (wall clock), "killed" (a signal: CPU limit, ...)
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: dict = field(default_factory=dict)
    run_id: str = ""  # in the runner's command line, so a test can look for its leftover processes

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _layout(expose: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """What the sandbox's root holds: (path, "dir" | "symlink", link target): /usr, Python, `expose`."""
    out: list[tuple[str, str, str]] = [("/usr", "dir", "")]
    for name in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(name):
            out.append((name, "symlink", os.readlink(name)))
        elif os.path.isdir(name):
            out.append((name, "dir", ""))
    prefix = os.path.realpath(sys.base_prefix)
    if not any(prefix == p or prefix.startswith(p + "/") for p, kind, _ in out if kind == "dir"):
        out.append((prefix, "dir", ""))
    return out + [(os.path.realpath(p), "expose", "") for p in expose]


def _interpreter() -> str:
    """The base interpreter (a venv's python is a symlink outside the sandbox's root)."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _bwrap_cmd(root: bool, expose: Sequence[str] = (), tmp_mb: int = 64) -> list[str]:
    cmd = ["bwrap", "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid", "--unshare-net",
           "--unshare-uts", "--unshare-cgroup-try"]
    if root:  # no user namespace: the runner switches to the real uid nobody; it keeps only what that needs
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY), "--cap-drop", "ALL"]
    made: set[str] = set()

    def bind(path: str) -> list[str]:
        parent, chain = os.path.dirname(path), []
        while parent not in ("/", "") and parent not in made:
            chain.append(parent)
            parent = os.path.dirname(parent)
        made.update(chain)  # bwrap would create them 0700: nobody could not reach Python
        return [a for d in reversed(chain) for a in ("--perms", "0755", "--dir", d)] + ["--ro-bind", path, path]

    layout = _layout(expose)
    for path, kind, target in layout:
        if kind == "symlink":
            cmd += ["--symlink", target, path]
        elif kind == "dir":
            cmd += bind(path)
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(tmp_mb << 20), "--tmpfs",
            "/tmp"]
    made -= {d for d in made if d == "/tmp" or d.startswith("/tmp/")}
    for path, kind, _ in layout:
        if kind == "expose":  # after /tmp, which would hide anything below it
            cmd += bind(path)
    return cmd + ["--chdir", "/tmp", "--"]


def _unshare_cmd(root: bool) -> list[str]:
    cmd = ["unshare", "--pid", "--net", "--mount", "--ipc", "--uts", "--fork", "--kill-child=SIGKILL",
           "--mount-proc"]
    if not root:
        cmd[1:1] = ["--user", "--map-root-user"]
    # unshare has no --die-with-parent: setpriv gives it a parent-death signal, so an evaluator that is killed
    # takes unshare and (--kill-child) the whole namespace with it
    return (["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []) + cmd


def _command(backend: str, expose: Sequence[str] = (), tmp_mb: int = 64) -> list[str]:
    root = os.geteuid() == 0
    return _bwrap_cmd(root, expose, tmp_mb) if backend == "bwrap" else _unshare_cmd(root)


_PROBED: dict[str, str | None] = {}
_PROBE_LOCK = threading.Lock()


def probe(backend: str) -> str | None:
    """None when `backend` isolates a trivial program on this machine, else why not (cached)."""
    with _PROBE_LOCK:
        if backend not in _PROBED:
            if shutil.which(backend) is None:
                _PROBED[backend] = f"{backend} is not installed"
            else:
                r = _run(backend, "print('ok')", None, Limits(timeout_s=20), hook=True)
                _PROBED[backend] = (None if r.passed and r.stdout.strip() == "ok" else
                                    f"{backend} failed: {(r.stderr.strip().splitlines() or [r.status])[-1]}")
        return _PROBED[backend]


def choose_backend(backend: str | None = None) -> str:
    """The isolation to use: `backend`, $TIANYING_SANDBOX, or the first of bwrap, unshare that works."""
    backend = backend or os.environ.get("TIANYING_SANDBOX") or None
    if backend is not None:
        if backend not in BACKENDS:
            raise SandboxUnavailable(f"sandbox backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        why = probe(backend)
        if why:
            raise SandboxUnavailable(f"cannot isolate generated code: {why}")
        return backend
    reasons = []
    for b in BACKENDS:
        why = probe(b)
        if why is None:
            return b
        reasons.append(why)
    raise SandboxUnavailable("cannot isolate generated code (" + "; ".join(reasons) + "); install bubblewrap "
                             "(apt-get install bubblewrap) or pass --unsafe-exec to run it unisolated")


def run_python(code: str, limits: Limits | None = None, *, test: str | None = None, backend: str | None = None,
               unsafe: bool = False, hook: bool = True, expose: Sequence[str] = ()) -> SandboxResult:
    """Run `code`, then the trusted `test` code (same globals), isolated; passed = both ran to the end.

    Args:
        backend: "bwrap" or "unshare" (default: $TIANYING_SANDBOX, else the first that works here).
        unsafe: run without namespaces when no isolation is available (the rlimits and the audit hook only).
        hook: install the Python audit hook (tests turn it off to show the OS layer holds on its own).
        expose: host directories to mount read-only at the same path (data a task needs).
    Raises SandboxUnavailable when no isolation works and `unsafe` is False.
    """
    limits = limits or Limits()
    if unsafe:
        try:
            b = choose_backend(backend)
        except SandboxUnavailable:
            b = "none"
    else:
        b = choose_backend(backend)
    return _run(b, code, test, limits, hook=hook, expose=expose)


def _run(backend: str, code: str, test: str | None, limits: Limits, *, hook: bool,
         expose: Sequence[str] = ()) -> SandboxResult:
    token, run_id = secrets.token_hex(16), secrets.token_hex(8)
    root = os.geteuid() == 0
    scratch = newroot = None
    cfg = {"backend": backend, "root": root and backend != "none", "nobody": NOBODY, "hook": hook,
           "cpu_s": int(limits.cpu_s or -(-limits.timeout_s // 1)), "memory_mb": limits.memory_mb,
           "file_mb": limits.file_mb, "processes": limits.processes, "tmp_mb": 4 * limits.file_mb,
           "layout": _layout(expose), "run_id": run_id, "workdir": "/tmp"}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
    if backend == "none":  # no namespaces: a private scratch directory stands in for /tmp
        scratch = os.path.realpath(tempfile.mkdtemp(prefix="tianying-sandbox-"))
        env.update(HOME=scratch, TMPDIR=scratch)
        cfg.update(root=False, workdir=scratch)
        prefix: list[str] = []
    else:
        prefix = _command(backend, expose, cfg["tmp_mb"])
        if backend == "unshare":
            newroot = cfg["newroot"] = tempfile.mkdtemp(prefix="tianying-sandbox-root-")
    job = tempfile.TemporaryFile()
    job.write(json.dumps({"token": token, "code": code, "test": test}).encode())
    job.seek(0)
    ctl_r, ctl_w = os.pipe()
    cfg.update(in_fd=job.fileno(), ctl_fd=ctl_w)
    argv = prefix + [_interpreter(), "-I", "-S", "-B", "-c", _RUNNER, json.dumps(cfg)]
    t0 = time.perf_counter()
    status, rc = "failed", None
    ctl = b""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, cwd=scratch or "/", env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, pass_fds=(job.fileno(), ctl_w), start_new_session=True)
        finally:
            os.close(ctl_w)
            job.close()
        box: list[bytes] = []
        reader = threading.Thread(target=_read_all, args=(ctl_r, box), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limits.timeout_s)
            # bwrap and unshare report a child killed by signal N as exit status 128 + N
            status = "passed" if rc == 0 else "killed" if rc < 0 or (rc > 128 and prefix) else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            try:  # bwrap / unshare and (--die-with-parent, --kill-child) the namespace's init with it
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            rc = proc.wait()
        reader.join(5)
        ctl = box[0] if box else b""
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout = out.read(limits.max_output * 4).decode("utf-8", "replace")[: limits.max_output]
        stderr = err.read(limits.max_output * 4).decode("utf-8", "replace")[: limits.max_output]
    for d in (scratch, newroot):
        if d:
            shutil.rmtree(d, ignore_errors=True)
    lines = ctl.decode("utf-8", "replace").split("\n")
    try:
        isolation = json.loads(lines[0]) if lines[0] else {}
    except ValueError:
        isolation = {}
    if not isinstance(isolation, dict):
        isolation = {}
    # a pass needs the runner's setup report first and this run's token later: never the exit code alone
    if status == "passed" and not (isolation and token in lines[1:]):
        status = "failed"
    return SandboxResult(status, rc, stdout, stderr, wall, isolation, run_id)


def _read_all(fd: int, box: list[bytes]) -> None:
    chunks = []
    with os.fdopen(fd, "rb") as f:
        while len(b"".join(chunks)) < 1 << 16:
            c = f.read1(4096)
            if not c:
                break
            chunks.append(c)
    box.append(b"".join(chunks)[: 1 << 16])
