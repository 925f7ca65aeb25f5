"""Runs ON the instance (uploaded as ``<root>/nko_remote.py``; standard library only).

    hash [--missing-ok] DIR   JSON list of {name, size, sha256} for the files under DIR; the
                              hash covers exactly ``size`` bytes (logs keep growing), and
                              checkpoints (*.pt) are hashed first, so logs are captured after
                              the checkpoint that records their offsets. A missing DIR, a file
                              that cannot be read, or one replaced or rewritten while hashed
                              (after a few tries) is an error (exit 3): the listing is used to
                              decide that an instance holds nothing left to lose. A file deleted
                              before it is hashed is left out (nothing of it is left to lose).
                              --missing-ok: a missing DIR lists as []
    verify MANIFEST           check {"root", "files": [{path, sha256, size}]}; prints
                              {"ok", "problems": [{path, why}]}, exit 1 when not ok
    unpack WHEEL DEST         extract a wheel (a zip) into DEST atomically
    runner CTL HB -- ARGV...  run ARGV (the trainer), heartbeat into CTL/heartbeat.json every
                              HB seconds, write CTL/exit.json when it ends; started detached
                              (nohup setsid) so it survives the SSH session
    status CTL                {runner/trainer pids and liveness, heartbeat, exit}
    activity CTLROOT          {run id: {"beat": last heartbeat time, "alive": whether that
                              heartbeat says the trainer runs, "started", "exit": runner start
                              and exit times}} for every runner under CTLROOT
    stop CTL                  SIGTERM the trainer (it keeps last.pt)
"""

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile

CHUNK = 1 << 20


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Shrank(IOError):
    pass


def _sha256(path, size, opened=None):
    """sha256 of the first ``size`` bytes; ``opened``: a list that receives the os.stat of
    the file actually read (its inode)."""
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        if opened is not None:
            opened.append(os.fstat(f.fileno()))
        while left > 0:
            b = f.read(min(CHUNK, left))
            if not b:
                raise Shrank("%s shrank while hashing" % path)
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def _skip(name):
    return name.startswith(".") or name.endswith((".tmp", ".part"))


class HashError(Exception):
    pass


def _hash_stable(path, tries=3):
    """(size, sha256) of a regular file read through the inode its name points to before and
    after the hash, which neither shrank nor was rewritten in place meanwhile (appending is
    fine: the hash covers ``size`` bytes); None when the file was deleted; HashError when it
    cannot be read or keeps changing."""
    for _ in range(tries):
        opened = []
        try:
            before = os.stat(path)
            if not stat.S_ISREG(before.st_mode):
                raise HashError("%s: not a regular file" % path)
            digest = _sha256(path, before.st_size, opened)
            after = os.stat(path)
        except FileNotFoundError:
            if not os.path.lexists(path):
                return None
            if os.path.islink(path) and not os.path.exists(path):
                raise HashError("%s: a dangling symbolic link" % path)
            continue  # replaced (renamed over) between two looks: hash the new file
        except Shrank:
            continue
        except OSError as e:
            raise HashError("%s: cannot read it: %s" % (path, e.strerror or e))
        inodes = {(x.st_dev, x.st_ino) for x in (before, opened[0], after)}
        rewritten = after.st_size == before.st_size and after.st_mtime_ns != before.st_mtime_ns
        if len(inodes) == 1 and after.st_size >= before.st_size and not rewritten:
            return before.st_size, digest
    raise HashError("%s: kept changing while it was hashed (%d tries)" % (path, tries))


def cmd_hash(root, missing_ok=False):
    if not os.path.isdir(root):
        if missing_ok and not os.path.lexists(root):
            print("[]")
            return 0
        print("hash: %s is not a directory (missing runs directory?)" % root, file=sys.stderr)
        return 3
    errors = []

    def walk_error(e):
        errors.append("%s: cannot list it: %s" % (e.filename, e.strerror or e))

    names = []
    for d, dirs, files in os.walk(root, onerror=walk_error):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in files:
            if not _skip(f):
                names.append(os.path.relpath(os.path.join(d, f), root))
    names.sort(key=lambda n: (not n.endswith(".pt"), n))
    out = []
    for n in names:
        try:
            got = _hash_stable(os.path.join(root, n))
        except HashError as e:
            errors.append(str(e))
            continue
        if got is not None:
            out.append({"name": n.replace(os.sep, "/"), "size": got[0], "sha256": got[1]})
    if errors:
        print("hash: " + "; ".join(errors[:10]), file=sys.stderr)
        return 3
    print(json.dumps(out))
    return 0


def cmd_verify(manifest_path):
    m = _read_json(manifest_path) or {}
    problems = []
    for f in m.get("files", []):
        p = os.path.join(m["root"], f["path"])
        try:
            size = os.stat(p).st_size
        except OSError:
            problems.append({"path": f["path"], "why": "missing"})
            continue
        if size != f["size"]:
            problems.append({"path": f["path"], "why": "size %d, expected %d" % (size, f["size"])})
        elif _sha256(p, size) != f["sha256"]:
            problems.append({"path": f["path"], "why": "sha256 differs"})
    print(json.dumps({"ok": not problems, "problems": problems}))
    return 0 if not problems else 1


def cmd_unpack(wheel, dest):
    if os.path.isdir(dest):
        return 0
    tmp = "%s.tmp-%d" % (dest, os.getpid())
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp)
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(dest):
            raise
    return 0


def _alive(pid):
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _gpu_util():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        values = [float(x) for x in out.split()]
        return sum(values) / len(values) if values else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def cmd_runner(ctl, hb, argv):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.makedirs(ctl, exist_ok=True)
    for name in ("exit.json", "heartbeat.json"):
        if os.path.exists(os.path.join(ctl, name)):
            os.remove(os.path.join(ctl, name))
    with open(os.path.join(ctl, "trainer.out"), "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _write_json(os.path.join(ctl, "runner.json"), {"runner_pid": os.getpid(), "trainer_pid": proc.pid,
                                                   "argv": argv, "started": time.time()})

    def forward(sig, frame):
        proc.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            rc = proc.wait(timeout=hb)
            break
        except subprocess.TimeoutExpired:
            _write_json(os.path.join(ctl, "heartbeat.json"),
                        {"time": time.time(), "trainer_alive": True, "gpu_util": _gpu_util()})
    _write_json(os.path.join(ctl, "exit.json"), {"rc": rc, "time": time.time()})
    _write_json(os.path.join(ctl, "heartbeat.json"), {"time": time.time(), "trainer_alive": False,
                                                      "gpu_util": None})
    return 0


def cmd_status(ctl):
    runner = _read_json(os.path.join(ctl, "runner.json")) or {}
    beat = _read_json(os.path.join(ctl, "heartbeat.json"))
    print(json.dumps({"now": time.time(), "started": runner.get("started"),
                      "runner_pid": runner.get("runner_pid"), "runner_alive": _alive(runner.get("runner_pid")),
                      "trainer_pid": runner.get("trainer_pid"), "trainer_alive": _alive(runner.get("trainer_pid")),
                      "heartbeat": beat, "exit": _read_json(os.path.join(ctl, "exit.json"))}))
    return 0


def cmd_activity(root):
    out = {}
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            ctl = os.path.join(root, name)
            beat = _read_json(os.path.join(ctl, "heartbeat.json")) or {}
            runner = _read_json(os.path.join(ctl, "runner.json")) or {}
            done = _read_json(os.path.join(ctl, "exit.json")) or {}
            out[name] = {"beat": beat.get("time"), "alive": bool(beat.get("trainer_alive")),
                         "started": runner.get("started"), "exit": done.get("time")}
    print(json.dumps(out))
    return 0


def cmd_stop(ctl):
    runner = _read_json(os.path.join(ctl, "runner.json")) or {}
    pid = runner.get("trainer_pid")
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
    return 0


def main(argv):
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "hash":
        return cmd_hash(args[-1], missing_ok="--missing-ok" in args[:-1])
    if cmd == "verify":
        return cmd_verify(args[0])
    if cmd == "unpack":
        return cmd_unpack(args[0], args[1])
    if cmd == "runner":
        sep = args.index("--")
        return cmd_runner(args[0], float(args[1]), args[sep + 1:])
    if cmd == "status":
        return cmd_status(args[0])
    if cmd == "activity":
        return cmd_activity(args[0])
    if cmd == "stop":
        return cmd_stop(args[0])
    print("unknown command %r" % cmd, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
