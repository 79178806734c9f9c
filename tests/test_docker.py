"""The Docker image's recipe, checked without a Docker daemon.

docker/Dockerfile must install exactly the lock (constraints.txt), poft-ds from a wheel, and run as
a non-root user; the build context (.dockerignore) must hold exactly what the Dockerfile copies.
Building the image and running it is docker/check_image.sh (it needs a daemon).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
LOCK = ROOT / "constraints.txt"

# Packaging tools: `pip freeze` leaves them out of a lock, so the image pins them on its own.
BUILD_TOOLS = {"pip", "setuptools", "wheel"}
# pip options that cannot bring in a package from outside the lock (those taking a value first).
PIP_VALUE_OPTIONS = {"-r", "--requirement", "--index-url", "-i", "--no-binary", "--only-binary"}
PIP_FLAGS = {"--no-deps", "--no-build-isolation", "--force-reinstall", "-q", "--quiet", "--no-cache-dir"}


# ---------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined
    line: int  # where it starts (1-based)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions as Docker does for the default escape character.

    A trailing backslash continues the instruction on the next line; comment lines and empty
    lines inside a continuation are dropped, as Docker drops them. Heredocs are not supported.
    """
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and parts):
            continue
        if not stripped:
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, args = " ".join(parts).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    if parts:
        raise ValueError(f"Dockerfile line {start}: continuation runs past the end of the file")
    return instructions


def split_stages(instructions: list[Instruction]) -> tuple[list[Instruction], list[list[Instruction]]]:
    """The instructions before the first FROM (global ARGs) and each stage's, FROM first."""
    head: list[Instruction] = []
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([ins])
        elif stages:
            stages[-1].append(ins)
        else:
            head.append(ins)
    return head, stages


def stage_name(stage: list[Instruction]) -> str | None:
    words = stage[0].args.split()
    return words[2] if len(words) == 3 and words[1].upper() == "AS" else None


def expand(text: str, args: dict[str, str]) -> str:
    """Substitute `$NAME` and `${NAME}` for the build arguments in `args`; other variables stay."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return args.get(name, m.group(0))

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, text)


def arg_defaults(instructions: list[Instruction], inherited: dict[str, str] | None = None) -> dict[str, str]:
    """`ARG NAME=default` values in order (a bare `ARG NAME` takes the global default, if any)."""
    inherited = inherited or {}
    values: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword != "ARG":
            continue
        for word in shlex.split(ins.args):
            name, eq, default = word.partition("=")
            if eq:
                values[name] = expand(default, values)
            elif name in inherited:
                values[name] = inherited[name]
    return values


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at `&&`, `||`, `;`, `|`, parentheses), leading
    `NAME=value` assignments removed."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set("();<>|&"):
            commands.append([])
        else:
            commands[-1].append(token)
    out = []
    for cmd in commands:
        while cmd and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
            cmd = cmd[1:]
        if cmd:
            out.append(cmd)
    return out


def pip_command(cmd: list[str], subcommand: str) -> list[str] | None:
    """The arguments after `pip <subcommand>` (also `python -m pip`), or None for other commands."""
    if cmd[:1] == ["pip"] or (len(cmd) > 1 and Path(cmd[0]).name == "pip"):
        rest = cmd[1:]
    elif len(cmd) > 2 and Path(cmd[0]).name.startswith("python") and cmd[1:3] == ["-m", "pip"]:
        rest = cmd[3:]
    else:
        return None
    return rest[1:] if rest[:1] == [subcommand] else None


def copy_sources(ins: Instruction) -> tuple[list[str], str, dict[str, str]]:
    """Sources, destination and `--flag=value` options of a COPY or ADD."""
    words = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    if len(words) < 2:
        raise ValueError(f"Dockerfile line {ins.line}: {ins.keyword} needs a source and a destination")
    return words[:-1], words[-1], flags


# ---------------------------------------------------------------- checks


def read_lock(text: str) -> dict[str, str]:
    """`name==version` lines by normalized name; anything else in a lock is an error."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if not m:
            raise ValueError(f"constraints.txt line {number}: {line!r} is not an exact name==version pin")
        name = normalize(m.group(1))
        if name in pins:
            raise ValueError(f"constraints.txt line {number}: {m.group(1)} is pinned twice")
        pins[name] = m.group(2)
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_pip_installs(dockerfile: str, lock: dict[str, str]) -> list[str]:
    """Every `pip install` must take its packages from the lock: `-r` of the lock as copied into
    the image, `name==version` equal to the lock's pin (after build-argument defaults), the poft-ds
    wheel, or a pinned packaging tool. Only the torch install may pull dependencies (the CUDA
    build's own nvidia-* packages, which a CPU-made lock lacks), and the lock must follow it.

    Returns:
        One message per problem, naming the Dockerfile line.
    """
    problems: list[str] = []
    head, stages = split_stages(parse_dockerfile(dockerfile))
    global_args = arg_defaults(head)
    for stage in stages:
        args = arg_defaults(stage, global_args)
        lock_copies = set()
        torch_line = lock_line = None
        for ins in stage:
            if ins.keyword in ("COPY", "ADD"):
                sources, dest, flags = copy_sources(ins)
                if "from" not in flags and "constraints.txt" in sources:
                    lock_copies.add(dest.rstrip("/") + "/constraints.txt" if dest.endswith("/") else dest)
            if ins.keyword != "RUN":
                continue
            for cmd in shell_commands(expand(ins.args, args)):
                pip_args = pip_command(cmd, "install")
                if pip_args is None:
                    continue
                where = f"Dockerfile line {ins.line}: pip install {' '.join(pip_args)}"
                targets, flags = [], set()
                i = 0
                while i < len(pip_args):
                    word = pip_args[i]
                    if word in ("-e", "--editable") or word.startswith("--editable="):
                        problems.append(f"{where}: an editable install")
                    elif word in ("-r", "--requirement"):
                        targets.append(("lock", pip_args[i + 1] if i + 1 < len(pip_args) else ""))
                        i += 1
                    elif word in PIP_VALUE_OPTIONS:
                        flags.add(word)
                        i += 1
                    elif word in PIP_FLAGS:
                        flags.add(word)
                    elif word.startswith("-"):
                        problems.append(f"{where}: option {word} is not one the check knows keeps to the lock")
                    else:
                        targets.append(("package", word))
                    i += 1
                if not targets:
                    problems.append(f"{where}: installs nothing")
                is_torch = [t for t in targets if t[0] == "package" and normalize(t[1].split("==")[0]) == "torch"]
                for kind, value in targets:
                    if kind == "lock":
                        if value not in lock_copies:
                            problems.append(f"{where}: -r {value} is not constraints.txt as copied into this stage")
                        lock_line = lock_line or ins.line
                    elif value.endswith(".whl"):
                        if not Path(value).name.startswith("poft_ds-"):
                            problems.append(f"{where}: wheel {value} is not poft-ds's")
                    elif "==" in value:
                        name, _, version = value.partition("==")
                        key = normalize(name)
                        if key in BUILD_TOOLS and re.fullmatch(r"[0-9][0-9.]*", version):
                            continue
                        if lock.get(key) != version:
                            problems.append(f"{where}: {value} is not the lock's pin ({lock.get(key, 'not locked')})")
                    else:
                        problems.append(f"{where}: {value} is not pinned to the lock")
                if is_torch:
                    if len(targets) != 1 or not flags & {"--index-url", "-i"}:
                        problems.append(f"{where}: torch must be installed alone, from a CUDA --index-url")
                    torch_line = torch_line or ins.line
                elif targets and "--no-deps" not in flags:
                    problems.append(f"{where}: without --no-deps it may install packages outside the lock")
        if torch_line and not (lock_line and lock_line >= torch_line):
            problems.append(f"Dockerfile line {torch_line}: the lock is not installed after torch")
    return problems


def check_user(dockerfile: str) -> list[str]:
    """The final stage must switch to a non-root user after its last RUN."""
    _, stages = split_stages(parse_dockerfile(dockerfile))
    final = stages[-1]
    users = [(i, ins) for i, ins in enumerate(final) if ins.keyword == "USER"]
    if not users:
        return ["the final stage has no USER: it runs as root"]
    index, ins = users[-1]
    user = ins.args.split(":")[0].strip()
    problems = []
    if user in ("root", "0", ""):
        problems.append(f"Dockerfile line {ins.line}: USER {ins.args} is root")
    later_runs = [r.line for r in final[index + 1 :] if r.keyword == "RUN"]
    if later_runs:
        problems.append(f"Dockerfile line {later_runs[0]}: RUN after the last USER")
    return problems


# ---------------------------------------------------------------- .dockerignore


def parse_dockerignore(text: str) -> list[tuple[re.Pattern[str], bool]]:
    """Patterns as (regex, is_exception), translated as Docker's patternmatcher does: `*` within a
    path component, `**` across components, `?` one character; a leading `!` re-includes."""
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if exception else line).lstrip("/")
        if any(c in pattern for c in "[]\\"):
            raise ValueError(f".dockerignore: {line!r}: character classes and escapes are not supported here")
        regex, i = "", 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    i += 1
                regex += ".*" if i == len(pattern) else "(.*/)?"
                continue
            regex += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
            i += 1
        patterns.append((re.compile(f"^{regex}$"), exception))
    return patterns


def is_excluded(path: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Whether Docker leaves `path` (relative, `/`-separated) out of the build context: the last
    pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    parents = ["/".join(parts[:n]) for n in range(1, len(parts))]
    excluded = False
    for regex, exception in patterns:
        if regex.match(path) or any(regex.match(p) for p in parents):
            excluded = not exception
    return excluded


def context_files(root: Path, patterns: list[tuple[re.Pattern[str], bool]], under: str = "") -> list[str]:
    """Files under `root/under` that the build context would hold."""
    found = []
    for folder, _, files in os.walk(root / under):
        rel = Path(folder).relative_to(root).as_posix()
        for name in files:
            path = name if rel == "." else f"{rel}/{name}"
            if not is_excluded(path, patterns):
                found.append(path)
    return found


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def lock() -> dict[str, str]:
    return read_lock(LOCK.read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_lock_is_exact_and_setup_uses_it(lock: dict[str, str]) -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup
    # The pins setup.sh writes out (torch, installed before the rest) must be the lock's.
    for name, version in re.findall(r"\"([A-Za-z0-9_.-]+)==([^\"]+)\"", setup):
        assert lock.get(normalize(name)) == version, f"scripts/setup.sh pins {name}=={version}"
    with pytest.raises(ValueError, match="line 2: 'numpy>=2' is not an exact"):
        read_lock("torch==2.13.0\nnumpy>=2\n")
    with pytest.raises(ValueError, match="line 2: Jinja2 is pinned twice"):
        read_lock("jinja2==3.1.6\nJinja2==3.1.5\n")


def test_dockerfile_parsing() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG V=1.0\n"
        "ARG W=x-${V}\n"
        "FROM base:${V} AS one\n"
        "RUN a \\\n"
        "    # a comment inside the continuation\n"
        "    && b\n"
        "\n"
        "from one\n"
        "ARG V\n"
        'CMD ["x"]\n'
    )
    instructions = parse_dockerfile(text)
    assert [(i.keyword, i.line) for i in instructions] == [
        ("ARG", 2),
        ("ARG", 3),
        ("FROM", 4),
        ("RUN", 5),
        ("FROM", 9),
        ("ARG", 10),
        ("CMD", 11),
    ]
    assert instructions[3].args == "a && b"
    head, stages = split_stages(instructions)
    assert arg_defaults(head) == {"V": "1.0", "W": "x-1.0"}
    assert arg_defaults(stages[1], arg_defaults(head)) == {"V": "1.0"}
    assert stage_name(stages[0]) == "one"
    assert shell_commands("X=1 Y=2 pip install a && b 'c d' | e; f") == [
        ["pip", "install", "a"],
        ["b", "c d"],
        ["e"],
        ["f"],
    ]
    with pytest.raises(ValueError, match="line 1: continuation"):
        parse_dockerfile("RUN a \\\n")


def test_torch_and_deepspeed_args_match_the_lock(dockerfile: str, lock: dict[str, str]) -> None:
    _, stages = split_stages(parse_dockerfile(dockerfile))
    args = arg_defaults(stages[-1])
    assert args["TORCH_VERSION"] == lock["torch"]
    assert args["DEEPSPEED_VERSION"] == lock["deepspeed"]
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")


def test_image_installs_exactly_the_lock(dockerfile: str, lock: dict[str, str]) -> None:
    assert check_pip_installs(dockerfile, lock) == []
    # ... and installs it at all: the whole lock by -r, torch and DeepSpeed by their pins.
    final = split_stages(parse_dockerfile(dockerfile))[1][-1]
    args = arg_defaults(final)
    installs = [
        pip_args
        for ins in final
        if ins.keyword == "RUN"
        for cmd in shell_commands(expand(ins.args, args))
        if (pip_args := pip_command(cmd, "install")) is not None
    ]
    flat = [word for pip_args in installs for word in pip_args]
    assert "/opt/poft-ds/constraints.txt" in flat
    assert f"torch=={lock['torch']}" in flat and f"deepspeed=={lock['deepspeed']}" in flat


def test_pip_checker_rejects_installs_outside_the_lock() -> None:
    lock = {"torch": "2.13.0", "numpy": "2.3.5", "jinja2": "3.1.6"}
    good = (
        "FROM b AS image\nARG TORCH_VERSION=2.13.0\nCOPY constraints.txt /opt/c.txt\n"
        "RUN pip install --index-url https://x/cu128 torch==${TORCH_VERSION} "
        "&& pip install --no-deps -r /opt/c.txt && pip install --no-deps /w/poft_ds-0.1.0-py3-none-any.whl\n"
    )
    assert check_pip_installs(good, lock) == []
    bad = {
        "RUN pip install -e .": "editable",
        "RUN pip install --no-deps .": "not pinned",
        "RUN pip install --no-deps requests": "not pinned",
        "RUN pip install --no-deps numpy==1.26.0": "not the lock's pin (2.3.5)",
        "RUN pip install --no-deps Jinja2==3.1.6 rich==15.0.0": "not the lock's pin (not locked)",
        "RUN pip install numpy==2.3.5": "without --no-deps",
        "RUN pip install --no-deps -r requirements.txt": "-r requirements.txt is not constraints.txt",
        "RUN pip install --no-deps --extra-index-url https://x numpy==2.3.5": "option --extra-index-url",
        "RUN pip install torch==2.13.0": "from a CUDA --index-url",
        "RUN python3 -m pip install --no-deps /w/other-1.0-py3-none-any.whl": "not poft-ds's",
        "ARG TORCH_VERSION=2.12.0\nRUN pip install -i https://x/cu128 torch==$TORCH_VERSION": "(2.13.0)",
    }
    for line, message in bad.items():
        problems = check_pip_installs(f"FROM b\n{line}\n", lock)
        assert any(message in p for p in problems), (line, problems)
    late_lock = "FROM b\nCOPY constraints.txt /c.txt\nRUN pip install --no-deps -r /c.txt\nRUN pip install -i https://x torch==2.13.0\n"
    assert any("not installed after torch" in p for p in check_pip_installs(late_lock, lock))


def test_poft_ds_is_installed_from_its_wheel(dockerfile: str) -> None:
    _, stages = split_stages(parse_dockerfile(dockerfile))
    builders = {
        stage_name(stage)
        for stage in stages[:-1]
        for ins in stage
        if ins.keyword == "RUN" and any(pip_command(cmd, "wheel") is not None for cmd in shell_commands(ins.args))
    }
    final = stages[-1]
    copies = [copy_sources(ins) for ins in final if ins.keyword == "COPY"]
    assert any(flags.get("from") in builders for _, _, flags in copies), "the wheel is not copied from its build stage"
    assert all("poft_ds" not in sources for sources, _, flags in copies if "from" not in flags), "source tree copied"
    wheel_installs = [
        ins for ins in final if ins.keyword == "RUN" and re.search(r"pip install [^&]*poft_ds-\*\.whl", ins.args)
    ]
    assert len(wheel_installs) == 1
    assert not re.search(r"(^|\s)(-e|--editable)(\s|=)", dockerfile)


def test_image_runs_poft_ds_as_a_non_root_user(dockerfile: str) -> None:
    assert check_user(dockerfile) == []
    final = split_stages(parse_dockerfile(dockerfile))[1][-1]
    assert [json.loads(ins.args) for ins in final if ins.keyword == "ENTRYPOINT"] == [["poft-ds"]]
    # `poft-ds --version` reports the commit from this variable in an installed wheel.
    assert any("POFT_DS_GIT_COMMIT=${GIT_COMMIT}" in ins.args for ins in final if ins.keyword == "ENV")


def test_user_checker_rejects_root() -> None:
    assert check_user("FROM a\nRUN x\nUSER poft\n") == []
    assert check_user("FROM a\nUSER poft\nRUN x\nUSER 1000:1000\n") == []
    assert check_user("FROM a\nRUN x\n") == ["the final stage has no USER: it runs as root"]
    assert check_user("FROM a\nUSER poft\nUSER root\n") == ["Dockerfile line 3: USER root is root"]
    assert check_user("FROM a\nUSER 0:0\n") == ["Dockerfile line 2: USER 0:0 is root"]
    assert check_user("FROM a\nUSER poft\nRUN x\n") == ["Dockerfile line 3: RUN after the last USER"]
    # Only the final stage counts: a builder stage's USER does not make the image non-root.
    assert check_user("FROM a AS b\nUSER poft\nFROM b\nRUN x\n") == ["the final stage has no USER: it runs as root"]


def test_dockerignore_matching() -> None:
    patterns = parse_dockerignore("*\n!poft_ds\n**/__pycache__\n**/*.pyc\nexamples/*/assets\n!examples\n")
    cases = {
        "poft_ds/cli.py": False,
        "poft_ds/__pycache__/cli.cpython-311.pyc": True,
        "poft_ds/sub/x.pyc": True,
        "top.pyc": True,
        "pyproject.toml": True,
        "tests/test_docker.py": True,
        ".venv/bin/python": True,
        # `!examples` comes after `examples/*/assets`, and the last match wins.
        "examples/quickstart/assets/data/train.jsonl": False,
    }
    assert {path: is_excluded(path, patterns) for path in cases} == cases
    ordered = parse_dockerignore("*.md\n!README.md\n")
    assert not is_excluded("README.md", ordered) and is_excluded("NOTES.md", ordered)
    assert is_excluded("README.md", parse_dockerignore("!README.md\n*.md\n"))
    # `*` stays inside one path component; `**` crosses them.
    assert not is_excluded("docs/sub/a.md", parse_dockerignore("docs/*.md\n"))
    assert is_excluded("docs/sub/a.md", parse_dockerignore("docs/**/*.md\n"))
    assert is_excluded("docs/a.md", parse_dockerignore("docs/**/*.md\n"))
    assert not is_excluded("docs/a.mdx", parse_dockerignore("docs/*.md\n"))
    with pytest.raises(ValueError, match="character classes"):
        parse_dockerignore("[ab].txt\n")


def test_build_context_is_exactly_what_the_dockerfile_copies(dockerfile: str) -> None:
    patterns = parse_dockerignore(DOCKERIGNORE.read_text())
    sources = set()
    for stage in split_stages(parse_dockerfile(dockerfile))[1]:
        for ins in stage:
            if ins.keyword in ("COPY", "ADD"):
                srcs, _, flags = copy_sources(ins)
                if "from" not in flags:
                    sources.update(srcs)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not is_excluded(source, patterns), f"COPY {source}: excluded by .dockerignore"
        if (ROOT / source).is_dir():
            assert context_files(ROOT, patterns, source), f"COPY {source}: .dockerignore leaves it empty"
    allowed_top = {entry for entry in os.listdir(ROOT) if not is_excluded(entry, patterns)}
    assert allowed_top == {s.split("/")[0] for s in sources}
    for source in sources:
        if (ROOT / source).is_dir():
            for path in context_files(ROOT, patterns, source):
                assert "__pycache__" not in path and not path.endswith(".pyc"), path
                assert not re.match(r"examples/[^/]+/assets/", path), path
    for private in ("tests", ".venv", "runs", ".git", "docker"):
        if (ROOT / private).exists():
            assert is_excluded(private, patterns)
            assert context_files(ROOT, patterns, private) == [], f"{private}/ reaches the build context"


def test_a_wheel_install_finds_the_shipped_configs_and_sbatch_template(tmp_path: Path, assets: Path) -> None:
    """What the image does: poft-ds from its wheel, in an environment with no checkout to fall back on."""
    import shutil
    import subprocess
    import sys
    import sysconfig

    import yaml

    import poft_ds
    from tests.conftest import base_spec, write_spec

    # The wheel stage's build context: what its COPY lines take (the build writes there, not in the checkout).
    src, wheels, env_dir = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("poft_ds", "ds_configs", "launch"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "POFT_DS_GIT_COMMIT"}
    run = {"capture_output": True, "text": True, "timeout": 300, "env": env}
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src],
        **run,
    )
    assert built.returncode == 0, built.stderr
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True, **run)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], **run).stdout.strip()
    )
    # The dependencies from the test environment, as plain paths: its editable poft-ds is not loaded.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (wheel,) = wheels.glob("poft_ds-*.whl")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--prefix", env_dir, wheel],
        **run,
    )
    assert installed.returncode == 0, installed.stderr
    # ...beside, not instead of, the test environment's own poft-ds (pip would uninstall it otherwise).
    ours = subprocess.run([sys.executable, "-c", "import poft_ds; print(poft_ds.__file__)"], cwd=tmp_path, **run)
    assert ours.stdout.strip() == str(ROOT / "poft_ds" / "__init__.py"), ours.stdout + ours.stderr

    spec = base_spec(assets, tmp_path / "run", deepspeed={"train_config": "zero3.json"})  # by name: shipped
    spec["launcher"] = {"kind": "slurm"}
    cli = [
        python,
        "-c",
        "import sys, poft_ds.cli; print(poft_ds.__file__, file=sys.stderr); sys.exit(poft_ds.cli.main())",
    ]
    dry = subprocess.run([*cli, "launch", "--dry-run", write_spec(spec, tmp_path / "job.yaml")], cwd=tmp_path, **run)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stderr.splitlines()[0].startswith(str(site))  # the wheel's package, not the checkout
    assert "#SBATCH" in dry.stdout and "srun" in dry.stdout  # the sbatch template, rendered
    valid = subprocess.run([*cli, "validate", tmp_path / "job.yaml"], cwd=tmp_path, **run)
    assert valid.returncode == 0, valid.stderr[-3000:]
    shipped = yaml.safe_load(valid.stdout)["deepspeed"]["train_config"]  # `zero3.json`, found by name
    assert shipped == str(env_dir / "share" / "poft-ds" / "ds_configs" / "zero3.json")
    version = subprocess.run([*cli, "--version"], cwd=tmp_path, **run)
    # No checkout to ask for the commit: the version alone (the image sets POFT_DS_GIT_COMMIT).
    assert version.stdout.strip() == f"poft-ds {poft_ds.__version__}", version.stdout + version.stderr
