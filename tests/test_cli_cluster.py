"""`llm omni init / join / trust / untrust / id`, driven through llm's own CLI."""

from __future__ import annotations

import re
import stat

import pytest
from click.testing import CliRunner

from llm_omninode.net.admission import (
    Admission,
    cluster_fingerprint,
    format_secret,
    load_cluster_secret,
    load_trusted,
    parse_secret,
)
from llm_omninode.net.identity import NodeIdentity, load_or_create_identity

SECRET_RE = re.compile(r"omni-secret-[a-z2-7]+")


@pytest.fixture
def cli(omni_home):
    from llm.cli import cli as llm_cli

    runner = CliRunner()

    def invoke(*args, ok=True, input=None):
        result = runner.invoke(llm_cli, ["omni", *args], input=input, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_prints_the_secret_once_and_stores_it_0600(cli, omni_home):
    out = cli("init").output
    secrets_shown = SECRET_RE.findall(out)
    assert len(secrets_shown) == 1
    text = secrets_shown[0]
    secret = parse_secret(text)
    assert load_cluster_secret(omni_home) == secret
    assert mode(omni_home / "cluster_secret") == 0o600
    assert mode(omni_home / "node_key.pem") == 0o600
    node_id = load_or_create_identity(omni_home).node_id
    assert node_id in out and cluster_fingerprint(secret) in out
    assert "llm omni join SECRET" in out and "omni-shim --join SECRET" in out


def test_init_refuses_a_second_time_unless_forced(cli, omni_home):
    first = load_secret_after(cli("init"), omni_home)
    again = cli("init", ok=False)
    assert again.exit_code != 0
    assert "already has a cluster secret" in again.output and "--force" in again.output
    assert cluster_fingerprint(first) in again.output
    assert not SECRET_RE.search(again.output)  # never shown twice
    assert load_cluster_secret(omni_home) == first

    forced = cli("init", "--force")
    second = load_secret_after(forced, omni_home)
    assert second != first
    assert "join again" in forced.output
    assert mode(omni_home / "cluster_secret") == 0o600


def load_secret_after(result, home) -> bytes:
    secret = load_cluster_secret(home)
    assert secret is not None and SECRET_RE.findall(result.output) == [format_secret(secret)]
    return secret


@pytest.mark.parametrize(
    "garbage",
    [
        "hunter2",
        "omni-secret-",
        "omni-secret-tooshort",
        "omni-secret-" + "a" * 52 + "!",
        "OMNI-SECRET-" + "A" * 52,
    ],
)
def test_join_rejects_garbage(cli, omni_home, garbage):
    result = cli("join", garbage, ok=False)
    assert result.exit_code == 1 and "Error" in result.output
    assert not (omni_home / "cluster_secret").exists()


def test_join_saves_a_real_secret_and_prints_only_its_fingerprint(cli, omni_home):
    secret = bytes(range(32))
    text = format_secret(secret)
    out = cli("join", text).output
    assert cluster_fingerprint(secret) in out and text not in out
    assert load_cluster_secret(omni_home) == secret
    assert mode(omni_home / "cluster_secret") == 0o600
    cli("join", f"  {text}\n")  # the same secret again (pasted with blanks): fine
    # another cluster's secret: refused unless forced
    other = format_secret(bytes(32))
    refused = cli("join", other, ok=False)
    assert refused.exit_code == 1 and "already in another cluster" in refused.output
    assert other not in refused.output and text not in refused.output
    assert load_cluster_secret(omni_home) == secret
    cli("join", "--force", other)
    assert load_cluster_secret(omni_home) == bytes(32)


def test_join_asks_for_the_secret_without_echoing_it(cli, omni_home):
    text = format_secret(bytes(range(32)))
    result = cli("join", input=text + "\n")
    assert text not in result.output
    assert load_cluster_secret(omni_home) == bytes(range(32))


def test_join_secret_lets_two_homes_admit_each_other(cli, omni_home, tmp_path):
    text = SECRET_RE.findall(cli("init").output)[0]
    other_home = tmp_path / "other"
    other_home.mkdir()
    from llm_omninode.net.admission import save_cluster_secret

    save_cluster_secret(other_home, text)
    here, there = Admission.from_home(omni_home), Admission.from_home(other_home)
    assert here.fingerprint == there.fingerprint


def test_trust_list_untrust(cli, omni_home):
    a, b = NodeIdentity.generate().node_id, NodeIdentity.generate().node_id
    empty = cli("trust", "--list")
    assert empty.stdout == "" and "no trusted node ids" in empty.output
    assert cli("trust", a).output.strip() == f"trusted {a}"
    assert "already trusted" in cli("trust", a).output  # idempotent
    cli("trust", f" {b} ")
    assert cli("trust", "--list").stdout.split() == [a, b]
    assert load_trusted(omni_home) == {a, b}
    assert (omni_home / "trusted_nodes").read_text().count(a) == 1

    assert f"untrusted {a}" in cli("untrust", a).output
    assert "was not trusted" in cli("untrust", a).output
    assert cli("trust", "--list").stdout.split() == [b]
    assert load_trusted(omni_home) == {b}


def test_untrust_keeps_comments_and_other_lines(cli, omni_home):
    a, b = NodeIdentity.generate().node_id, NodeIdentity.generate().node_id
    omni_home.mkdir(parents=True)
    (omni_home / "trusted_nodes").write_text(f"# lab machines\n{a}  # desk\n\n{b}\n")
    cli("untrust", a)
    assert (omni_home / "trusted_nodes").read_text() == f"# lab machines\n\n{b}\n"


@pytest.mark.parametrize(
    "bad",
    ["omni1nope", "omni1" + "9" * 52, "peer-1", "OMNI1" + "a" * 52, "omni1" + "a" * 51 + "b"],
)
def test_trust_rejects_malformed_ids(cli, omni_home, bad):
    result = cli("trust", bad, ok=False)
    assert result.exit_code == 1 and "not" in result.output and "node id" in result.output
    assert not (omni_home / "trusted_nodes").exists()
    assert cli("untrust", bad, ok=False).exit_code == 1


def test_trust_usage_and_a_broken_trust_file(cli, omni_home):
    assert cli("trust", ok=False).exit_code == 2
    a = NodeIdentity.generate().node_id
    assert cli("trust", a, "--list", ok=False).exit_code == 2
    omni_home.mkdir(parents=True)
    (omni_home / "trusted_nodes").write_text("not-an-id\n")
    result = cli("trust", a, ok=False)
    assert result.exit_code == 1 and "line 1" in result.output
    assert (omni_home / "trusted_nodes").read_text() == "not-an-id\n"  # left as it was


def test_id_creates_the_identity_once_and_shows_the_cluster(cli, omni_home):
    first = cli("id")
    node_id = first.stdout.strip()
    assert node_id == load_or_create_identity(omni_home).node_id
    assert "no cluster yet" in first.stderr
    assert mode(omni_home / "node_key.pem") == 0o600
    cli("join", format_secret(bytes(range(32))))
    second = cli("id")
    assert second.stdout.strip() == node_id
    assert cluster_fingerprint(bytes(range(32))) in second.stderr


def test_an_unreadable_stored_secret_blocks_until_forced(cli, omni_home):
    omni_home.mkdir(parents=True)
    (omni_home / "cluster_secret").write_text("garbage\n")
    (omni_home / "cluster_secret").chmod(0o600)
    assert "already has a cluster secret" in cli("init", ok=False).output
    text = format_secret(bytes(range(32)))
    refused = cli("join", text, ok=False)
    assert refused.exit_code == 1 and "unreadable" in refused.output
    cli("join", "--force", text)
    assert load_cluster_secret(omni_home) == bytes(range(32))


def test_ui_prints_the_page_address_and_opens_it(cli, omni_home, monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    out = cli("ui", "--url", "http://0.0.0.0:47434/", "--token", "a b/c").output
    want = "http://127.0.0.1:47434/ui?token=a%20b%2Fc"
    assert out.strip() == f"cluster page: {want}" and opened == [want]
    assert cli("ui", "--url", "http://10.0.0.2:11434", "--no-browser").output.strip() == (
        "cluster page: http://10.0.0.2:11434/ui"
    )
    assert len(opened) == 1
    result = cli("ui", ok=False)  # nothing running on this data directory
    assert result.exit_code == 1 and "no shim is running here" in result.output


def test_serve_shows_and_checks_the_shims_own_flags(cli, omni_home, monkeypatch):
    from omninode_shim.main import main as shim_main

    shown = cli("serve", "--help").output
    for param in shim_main.params:  # one definition: every omni-shim flag, with its help
        assert all(opt in shown for opt in param.opts), param.opts
        assert (getattr(param, "help", None) or "").split(" (")[0][:30] in shown
    bad = cli("serve", "--max-memory", "1G", "--bogus", ok=False)
    assert bad.exit_code == 2 and "No such option '--bogus'" in bad.output
    assert cli("serve", "--parallel", "0", ok=False).exit_code == 2  # checked before the exec
    calls = []
    monkeypatch.setattr("os.execv", lambda path, argv: calls.append(argv))
    cli("serve", "--port", "0", "--no-mdns", "--peer", "10.0.0.2:7341")
    (argv,) = calls
    assert argv[1:] == ["-m", "omninode_shim", "--port", "0", "--no-mdns",
                        "--peer", "10.0.0.2:7341"]  # fmt: skip
