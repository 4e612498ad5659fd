"""The scheduling recipes in deploy/ parse, say what they must, and run a valid `etl` command."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from support import REPO

from etl.cli import main

DEPLOY = REPO / "deploy"
# A cron field: numbers, ranges, steps, lists, or *.
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
SECRETS = ("HYPERENGAGE_TOKEN", "HYPERENGAGE_API_KEY", "HYPERENGAGE_WORKSPACE_KEY")


def parse_etl(args: list[str]) -> click.Context:
    """Parse `etl ARGS` as the CLI would, without running it: an unknown command or a
    renamed option raises a click error."""
    command: click.Command = main
    while isinstance(command, click.Group):
        name, *args = args
        if name not in command.commands:
            raise click.UsageError(f"no command {name!r}")
        command = command.commands[name]
    return command.make_context(f"etl {command.name}", args)


def etl_args(tokens: list[str]) -> list[str]:
    """The arguments of the `etl` executable in a shell command line, up to a redirection."""
    start = next(i for i, t in enumerate(tokens) if Path(t).name == "etl") + 1
    args = []
    for token in tokens[start:]:
        if set(token) <= set(";&|<>()"):
            break
        args.append(token)
    return args


def cli_envvars() -> set[str]:
    """Every environment variable an option of any command reads."""
    found: set[str] = set()

    def visit(command: click.Command) -> None:
        found.update(p.envvar for p in command.params if isinstance(p.envvar, str))
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                visit(sub)

    visit(main)
    return found


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are CamelCase
    parser.read_string((DEPLOY / name).read_text())
    return parser


def test_the_checker_catches_a_renamed_option() -> None:
    """parse_etl refuses what the CLI refuses, so the recipes below are really checked."""
    assert parse_etl(["sync", "--metrics-file", "/var/lib/x.prom"]).params["metrics_file"] == Path(
        "/var/lib/x.prom"
    )
    with pytest.raises(click.NoSuchOption):
        parse_etl(["sync", "--metrics-path", "/var/lib/x.prom"])
    with pytest.raises(click.UsageError):
        parse_etl(["synchronise"])


def test_crontab_runs_a_valid_sync_with_env_from_a_file_and_a_log() -> None:
    """One job line: five schedule fields, then sourcing the env file and `etl sync` logged."""
    lines = [
        line
        for line in (DEPLOY / "crontab").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    jobs = [line for line in lines if not re.match(r"^[A-Z_]+=", line)]
    assert len(jobs) == 1
    *schedule, command = jobs[0].split(None, 5)
    assert len(schedule) == 5
    assert all(CRON_FIELD.match(field) for field in schedule), schedule
    assert "%" not in command  # cron turns % into a newline
    tokens = list(shlex.shlex(command, posix=True, punctuation_chars=True))
    assert "flock" not in tokens  # etl locks the state store itself
    assert tokens[:5] == ["set", "-a", "&&", ".", "/etc/etl/etl.env"]
    assert ">>" in tokens  # appended to a log file
    log_file = tokens[tokens.index(">>") + 1]
    assert log_file.startswith("/var/log/")
    args = etl_args(tokens)
    assert args[0] == "sync"
    params = parse_etl(args).params
    assert params["metrics_file"] == Path("/var/lib/node_exporter/textfile/etl-sync.prom")


def test_the_env_file_example_names_only_real_variables() -> None:
    """KEY=value lines, every ETL_* variable one the CLI reads, the secrets placeholders."""
    values = {}
    for line in (DEPLOY / "etl.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert re.fullmatch(r"[A-Z_]+", key), line
            assert not value.startswith(("'", '"')), "systemd would keep the quotes"
            values[key] = value
    known = cli_envvars()
    assert {k for k in values if k.startswith("ETL_")} <= known
    for name in SECRETS:
        assert values[name] == "CHANGE-ME"


def test_systemd_service_is_a_hardened_oneshot_running_a_valid_sync() -> None:
    """Type=oneshot, an EnvironmentFile, hardening, and an ExecStart the CLI accepts."""
    unit = read_unit("etl-sync.service")
    service = unit["Service"]
    assert service["Type"] == "oneshot"
    assert service["EnvironmentFile"] == "/etc/etl/etl.env"  # the crontab's file too
    assert service["User"] == "etl"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert service["UMask"] == "0077"
    assert "network-online.target" in unit["Unit"]["After"]
    executable, *args = shlex.split(service["ExecStart"])
    assert Path(executable).name == "etl"
    assert Path(executable).is_absolute()
    params = parse_etl(args).params
    # ProtectSystem=strict makes everything read-only but what is listed.
    metrics_dir = str(params["metrics_file"].parent)
    assert metrics_dir in service["ReadWritePaths"].split()
    assert service["StateDirectory"] == "etl"
    assert "3" in service["SuccessExitStatus"].split()


def test_systemd_timer_is_persistent_and_randomised() -> None:
    """Persistent=true, a RandomizedDelaySec, a daily OnCalendar, and it starts the service."""
    timer = read_unit("etl-sync.timer")
    assert timer["Timer"]["Persistent"] == "true"
    assert re.fullmatch(r"\d+(min|s|h)?", timer["Timer"]["RandomizedDelaySec"])
    assert timer["Timer"]["OnCalendar"].startswith("*-*-* ")
    assert timer["Timer"].get("Unit", "etl-sync.service") == "etl-sync.service"
    assert (DEPLOY / "etl-sync.service").exists()
    assert timer["Install"]["WantedBy"] == "timers.target"


@pytest.fixture
def cronjob() -> dict[str, Any]:
    documents = list(yaml.safe_load_all((DEPLOY / "k8s-cronjob.yaml").read_text()))
    (job,) = [d for d in documents if d and d.get("kind") == "CronJob"]
    return dict(job)


def test_k8s_cronjob_forbids_overlap_and_bounds_retries(cronjob: dict[str, Any]) -> None:
    """batch/v1, a five-field schedule, concurrencyPolicy Forbid, backoffLimit, restartPolicy."""
    assert cronjob["apiVersion"] == "batch/v1"
    spec = cronjob["spec"]
    assert len(spec["schedule"].split()) == 5
    assert all(CRON_FIELD.match(field) for field in spec["schedule"].split())
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert isinstance(job["backoffLimit"], int)
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    if "podFailurePolicy" in job:
        assert pod["restartPolicy"] == "Never"  # the API server refuses it otherwise
        (rule,) = job["podFailurePolicy"]["rules"]
        assert rule["onExitCodes"]["containerName"] == pod["containers"][0]["name"]
        assert 1 not in rule["onExitCodes"]["values"]  # a failed run is retried


def test_k8s_cronjob_takes_secrets_from_a_secret_and_mappings_from_a_configmap(
    cronjob: dict[str, Any],
) -> None:
    """Secrets by secretKeyRef only, state on PostgreSQL, mappings mounted, resources set."""
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    for name in (*SECRETS, "ETL_SOURCE_URL"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"]["key"]
    assert env["ETL_STATE_URL"]["value"].startswith("postgresql+psycopg://")
    assert ":" not in env["ETL_STATE_URL"]["value"].split("//")[1].split("@")[0]  # no password
    assert {n for n in env if n.startswith("ETL_")} <= cli_envvars()
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = mounts[env["ETL_MAPPINGS"]["value"]]
    (mapped,) = [v for v in pod["volumes"] if v["name"] == volume]
    assert mapped["configMap"]["name"]
    resources = container["resources"]
    assert resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_k8s_cronjob_runs_a_valid_etl_command(cronjob: dict[str, Any]) -> None:
    """`command` + `args` make an invocation the CLI accepts."""
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = [*container["command"], *container.get("args", [])]
    assert Path(command[0]).name == "etl"
    assert command[1] == "sync"
    parse_etl(command[1:])
