"""The capture rules (webhook/dataplane/capture.py): golden files per option set, plus the
planning of re-runs and clean-ups against a namespace's current nat table. No root needed.

Each golden file is exactly what ``sidemesh init-traffic --dry-run ARGS`` prints (IPv4 then
IPv6). ``UPDATE_GOLDEN=1`` (``make golden``) rewrites them and deletes files no case produces;
otherwise a stale file fails the run."""

from __future__ import annotations

import shlex

import pytest

from tests.conftest import REPO, TESTDATA, UPDATE_GOLDEN
from webhook.cli.main import main
from webhook.cli.traffic import capture_options
from webhook.config import MeshConfig
from webhook.dataplane.capture import (
    CHAINS,
    CaptureOptions,
    apply_input,
    cleanup_input,
    parse_cidrs,
    parse_ports,
    rule_count,
    rules,
    sidemesh_state,
)
from webhook.dataplane.netns import has_global_ipv6
from webhook.errors import AnnotationError, TrafficError
from webhook.inject.annotations import (
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_CIDRS,
    read_overrides,
)
from webhook.inject.containers import init_args

GOLDEN = TESTDATA / "iptables"

#: What the injector emits by default (docs/CONTRACTS.md, section 2).
INJECTED = (
    "--proxy-uid 1337 --proxy-gid 1337 --inbound-port 15006 --outbound-port 15001 "
    "--include-inbound-ports '*' --exclude-inbound-ports 15020,15021,15090 "
    "--include-outbound-cidrs '*' "
)

#: case name -> command line (later flags override earlier ones, as argparse does)
CASES: dict[str, str] = {
    "default": INJECTED,
    "no-flags": "",
    "include-inbound-ports": INJECTED + "--include-inbound-ports 80,8080,15021",
    "no-inbound": INJECTED + "--include-inbound-ports ''",
    "exclude-inbound-ports": INJECTED + "--exclude-inbound-ports 15020,15021,15090,9000,22",
    "exclude-outbound": INJECTED
    + "--exclude-outbound-cidrs 192.168.0.0/16,169.254.169.254,fd00:ec2::254/128 "
    + "--exclude-outbound-ports 5432,6379",
    "include-outbound-cidrs": INJECTED + "--include-outbound-cidrs 10.0.0.0/8,fd00::/8",
    "include-outbound-v4-only": INJECTED
    + "--include-outbound-cidrs 10.96.0.0/12,10.244.0.0/16 --exclude-outbound-cidrs 10.96.0.10",
    "no-outbound": INJECTED + "--include-outbound-cidrs ''",
    "custom-ids-and-ports": "--proxy-uid 2000 --proxy-gid 3000 "
    + "--inbound-port 16006 --outbound-port 16001",
}


def _dry_run(args: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["init-traffic", "--dry-run", *shlex.split(args)]) == 0
    return capsys.readouterr().out


@pytest.mark.golden
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_rules(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    produced = _dry_run(CASES[case], capsys)
    path = GOLDEN / f"{case}.rules"
    if UPDATE_GOLDEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(produced)
    assert path.exists(), f"missing golden {path}; run `make golden`"
    assert produced == path.read_text(), f"{path} differs; `make golden` if intended"


@pytest.mark.golden
def test_no_stale_golden_files() -> None:
    stale = sorted(p for p in GOLDEN.glob("*") if p.suffix != ".rules" or p.stem not in CASES)
    if UPDATE_GOLDEN:
        for path in stale:
            path.unlink()
        return
    assert not stale, f"golden files no case produces (run `make golden`): {stale}"


def _chain(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def test_exclusions_come_before_captures_and_win() -> None:
    opts = CaptureOptions(
        include_inbound_ports=(80, 15020),
        exclude_inbound_ports=(80,),
        include_outbound_cidrs=("10.0.0.0/8",),
        exclude_outbound_cidrs=("10.1.0.0/16",),
    )
    inbound = _chain(rules(opts), "SIDEMESH_INBOUND")
    # 15020 is never captured even when included; 80 is both included and excluded: excluded
    assert not [r for r in inbound if r.endswith("SIDEMESH_IN_REDIRECT")]
    assert "-A SIDEMESH_INBOUND -p tcp --dport 15020 -j RETURN" in inbound
    output = _chain(rules(opts), "SIDEMESH_OUTPUT")
    assert output.index("-A SIDEMESH_OUTPUT -d 10.1.0.0/16 -j RETURN") < output.index(
        "-A SIDEMESH_OUTPUT -d 10.0.0.0/8 -j SIDEMESH_REDIRECT"
    )


def test_passthrough_source_is_first_then_proxy_then_loopback() -> None:
    for family, source in ((4, "127.0.0.6/32"), (6, "::6/128")):
        output = _chain(rules(CaptureOptions(), family), "SIDEMESH_OUTPUT")  # type: ignore[arg-type]
        assert output[:4] == [
            f"-A SIDEMESH_OUTPUT -s {source} -o lo -j RETURN",
            "-A SIDEMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A SIDEMESH_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A SIDEMESH_OUTPUT -o lo -j RETURN",
        ]
        assert output[-1] == "-A SIDEMESH_OUTPUT -j SIDEMESH_REDIRECT"


def test_cidrs_are_split_by_family() -> None:
    opts = CaptureOptions(
        include_outbound_cidrs=("10.0.0.0/8",), exclude_outbound_cidrs=("fd00::/8", "10.9.0.0/16")
    )
    assert "fd00" not in rules(opts, 4)
    v6 = rules(opts, 6)
    assert "10." not in v6 and _chain(v6, "SIDEMESH_OUTPUT") == []  # no IPv6 include: none


@pytest.mark.parametrize(
    ("flag", "text", "expected"),
    [
        ("--include-inbound-ports", "*", None),
        ("--include-inbound-ports", "", ()),
        ("--include-inbound-ports", " 80, 8080,80 ", (80, 8080)),
        ("--include-inbound-ports", "80,8080-8082,8081", (80, 8080, 8081, 8082)),
    ],
)
def test_parse_ports(flag: str, text: str, expected: tuple[int, ...] | None) -> None:
    assert parse_ports(flag, text) == expected


def test_parse_cidrs_normalises() -> None:
    assert parse_cidrs("--x", "10.0.0.0/8, 192.168.1.1 ,FD00::/8") == (
        "10.0.0.0/8",
        "192.168.1.1/32",
        "fd00::/8",
    )
    assert parse_cidrs("--x", "*") is None


# init-traffic reads its flags with the parsers the injector reads the annotations with: the
# same value is accepted or refused on both sides, for the same reason.
_SAME_RULES = [
    (INCLUDE_INBOUND_PORTS, "--include-inbound-ports", "80,http"),
    (EXCLUDE_INBOUND_PORTS, "--exclude-inbound-ports", "80,,81"),
    (EXCLUDE_INBOUND_PORTS, "--exclude-inbound-ports", "9-1"),
    (EXCLUDE_OUTBOUND_PORTS, "--exclude-outbound-ports", "70000"),
    (EXCLUDE_OUTBOUND_PORTS, "--exclude-outbound-ports", "²"),
    (INCLUDE_OUTBOUND_CIDRS, "--include-outbound-cidrs", "10.1.2.3/8"),
    (EXCLUDE_OUTBOUND_CIDRS, "--exclude-outbound-cidrs", "10.0.0.0/33,"),
]


@pytest.mark.parametrize(("annotation", "flag", "value"), _SAME_RULES)
def test_flags_and_annotations_share_rules_and_reasons(
    annotation: str, flag: str, value: str
) -> None:
    with pytest.raises(AnnotationError) as refused:
        read_overrides({annotation: value}, MeshConfig())
    parse = parse_cidrs if flag.endswith("cidrs") else parse_ports
    with pytest.raises(TrafficError) as also_refused:
        parse(flag, value)
    assert str(refused.value) == f"annotation {annotation}={value!r}: {refused.value.why}"
    assert str(also_refused.value) == f"{flag}={value!r}: {refused.value.why}"


def test_what_the_injector_writes_init_traffic_reads() -> None:
    annotations = {
        INCLUDE_INBOUND_PORTS: "8000-8002, 9090",
        EXCLUDE_OUTBOUND_PORTS: "5432",
        INCLUDE_OUTBOUND_CIDRS: "10.0.0.0/8, 192.168.1.1, FD00::/8",
        EXCLUDE_OUTBOUND_CIDRS: "10.96.0.0/12",
    }
    ov = read_overrides(annotations, MeshConfig())
    opts = capture_options(init_args(MeshConfig(), ov))
    assert opts.include_inbound_ports == ov.include_inbound_ports == (8000, 8001, 8002, 9090)
    assert opts.include_outbound_cidrs == ov.include_outbound_cidrs
    assert opts.exclude_outbound_cidrs == ov.exclude_outbound_cidrs == ("10.96.0.0/12",)
    assert opts.exclude_outbound_ports == ov.exclude_outbound_ports == (5432,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--exclude-outbound-ports", "5432,http"],
            "--exclude-outbound-ports='5432,http': 'http' is not a port number",
        ),
        (
            ["--include-inbound-ports", "70000"],
            "--include-inbound-ports='70000': port 70000 is outside 1-65535",
        ),
        (["--exclude-outbound-cidrs", "10.0.0.0/33"], "'10.0.0.0/33' is not a CIDR"),
        (["--inbound-port", "0"], "--inbound-port=0: port 0 is outside 1-65535"),
        (["--proxy-uid", "0"], "--proxy-uid 0: must be a non-root id"),
        (["--inbound-port", "15001"], "must differ"),
        (["--exclude-outbound-cidrs", "*"], "'*' is not allowed"),
    ],
)
def test_bad_flags_are_named(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init-traffic", "--dry-run", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("sidemesh init-traffic: error:")


def test_options_refuse_bad_values_directly() -> None:
    with pytest.raises(TrafficError, match="--exclude-outbound-ports=0: port 0 is outside"):
        CaptureOptions(exclude_outbound_ports=(0,))
    with pytest.raises(TrafficError, match=r"'10\.1\.2\.3/8' is not a CIDR"):
        CaptureOptions(exclude_outbound_cidrs=("10.1.2.3/8",))


# --- planning against the current nat table ------------------------------------------------

FOREIGN = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI_HOSTPORT - [0:0]
-A OUTPUT -p tcp -j CNI_HOSTPORT
-A CNI_HOSTPORT -p tcp --dport 9999 -j RETURN
COMMIT
"""


def _after_apply(saved: str) -> str:
    """A faithful enough iptables-save of FOREIGN after our rules were applied once."""
    ours = [line for line in rules(CaptureOptions()).splitlines() if line[:1] in ":-"]
    head, _, _ = saved.partition("COMMIT")
    return head + "\n".join(ours) + "\nCOMMIT\n"


def test_first_apply_deletes_nothing() -> None:
    assert "-D " not in apply_input(FOREIGN, CaptureOptions())
    assert sidemesh_state(FOREIGN).chains == ()


def test_rerun_removes_previous_jumps_only() -> None:
    saved = _after_apply(FOREIGN)
    state = sidemesh_state(saved)
    assert state.chains == CHAINS
    assert state.jumps == (
        "-A PREROUTING -p tcp -j SIDEMESH_INBOUND",
        "-A OUTPUT -p tcp -j SIDEMESH_OUTPUT",
    )
    text = apply_input(saved, CaptureOptions())
    deletes = [line for line in text.splitlines() if line.startswith("-D")]
    assert deletes == [
        "-D PREROUTING -p tcp -j SIDEMESH_INBOUND",
        "-D OUTPUT -p tcp -j SIDEMESH_OUTPUT",
    ]
    assert text.index("-D OUTPUT") < text.index("-A OUTPUT -p tcp -j SIDEMESH_OUTPUT")
    assert "CNI_HOSTPORT" not in text


def test_cleanup_removes_ours_and_nothing_else() -> None:
    assert cleanup_input(FOREIGN) is None
    text = cleanup_input(_after_apply(FOREIGN))
    assert text is not None
    assert "CNI_HOSTPORT" not in text
    lines = text.splitlines()
    assert lines.index("-F SIDEMESH_OUTPUT") < lines.index("-X SIDEMESH_INBOUND")
    assert lines[-1] == "COMMIT"


def test_rule_count_counts_nat_rules() -> None:
    assert rule_count(FOREIGN) == 2
    assert rule_count(FOREIGN.replace("*nat", "*filter")) == 0


IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fe80000000000000a8b1c2fffed3e4f5 02 40 20 80     eth0
"""


def test_ipv6_auto_detection() -> None:
    assert not has_global_ipv6(IF_INET6)  # loopback and link-local only
    ula = "fd005e00000000000000000000000002 02 40 00 80     eth0\n"
    assert has_global_ipv6(IF_INET6 + ula)


def test_pure_modules_do_no_io() -> None:
    source = (REPO / "webhook/dataplane/capture.py").read_text()
    for banned in ("import subprocess", "import os", "open(", "import time"):
        assert banned not in source


# --- the contract with the injector ---------------------------------------------------------


def _injected_init_args(annotations: dict[str, str]) -> list[str]:
    from webhook.config import MeshConfig
    from webhook.inject.pod import inject_pod

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "labels": {"sidemesh.io/inject": "true"}},
        "spec": {
            "containers": [{"name": "web", "image": "web:1", "ports": [{"containerPort": 8080}]}]
        },
    }
    pod["metadata"]["annotations"] = annotations  # type: ignore[index]
    result = inject_pod(pod, namespace="shop", config=MeshConfig(), bundle="PEM")
    init = result.pod["spec"]["initContainers"][0]
    assert init["command"] == ["sidemesh", "init-traffic"]
    return [str(arg) for arg in init["args"]]


def test_what_the_injector_emits_gives_the_default_rules(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = _injected_init_args({})
    assert _dry_run(shlex.join(args), capsys) == (GOLDEN / "default.rules").read_text()


def test_injected_traffic_annotations_reach_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    args = _injected_init_args(
        {
            "traffic.sidemesh.io/include-inbound-ports": "8080",
            "traffic.sidemesh.io/exclude-outbound-cidrs": "169.254.169.254/32",
            "traffic.sidemesh.io/exclude-outbound-ports": "5432",
        }
    )
    out = _dry_run(shlex.join(args), capsys)
    assert "-A SIDEMESH_INBOUND -p tcp --dport 8080 -j SIDEMESH_IN_REDIRECT" in out
    assert "-A SIDEMESH_INBOUND -p tcp -j SIDEMESH_IN_REDIRECT" not in out
    assert "-A SIDEMESH_OUTPUT -d 169.254.169.254/32 -j RETURN" in out
    assert "-A SIDEMESH_OUTPUT -p tcp --dport 5432 -j RETURN" in out
