"""The policy engine: the file's shape (errors name the line), default deny, matching."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from goclaw.cli import DEFAULT_POLICY
from goclaw.policy import PolicyError, load_policy, parse_policy

TOOLS = frozenset({"read_file", "write_file", "list_dir", "exec", "web_fetch"})
WS = "/work/ws"


def parse(text: str):
    return parse_policy(textwrap.dedent(text), "policy.yaml", TOOLS)


def error_of(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        parse(text)
    return str(info.value)


# -- shape errors, each naming its line ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 1\nallow: []\nbogus: 3\n", "policy.yaml:3: bogus: unknown key"),
        ("version: 1\nallow:\n  - tools.read_file\n  - tools.nope\n", "policy.yaml:4: allow[1]:"),
        ("version: 1\nallow: [frobnicate]\n", "policy.yaml:2: allow[0]: unknown capability"),
        ("version: 1\nallow: [tools.*]\n", "policy.yaml:2: allow[0]: unknown tool capability"),
        ("version: 1\nnetworks:\n  - 10.0.0.1/8\n", "policy.yaml:3: networks[0]: '10.0.0.1/8'"),
        ("version: 1\nnetworks: [not-a-net]\n", "policy.yaml:2: networks[0]:"),
        ("version: 1\ndomains:\n  - bad_host!\n", "policy.yaml:3: domains[0]:"),
        ("version: 1\ndomains: ['*.example.com']\n", "write .example.com"),
        ("- just\n- a list\n", "policy.yaml:1: the top level must be a mapping"),
        ("", "policy.yaml:1: the top level must be a mapping"),
        ("version: 1\nallow: [a\n", "policy.yaml:3: not valid YAML"),
        ("allow: []\n", "policy.yaml:1: version: missing"),
        ("version: 2\n", "policy.yaml:1: version: must be 1"),
        ("version: 1\nallow: tools.exec\n", "policy.yaml:2: allow: must be a list"),
        ("version: 1\nallow: []\nallow: []\n", "policy.yaml:3: allow: duplicate key"),
        ("version: 1\npaths: ['../out']\n", "policy.yaml:2: paths[0]: '../out' leaves"),
        ("version: 1\nagents: [a]\n", "policy.yaml:2: agents: must be a mapping"),
        ("version: 1\nagents:\n  Bad!: {}\n", "policy.yaml:3: agents.Bad!: invalid agent id"),
        (
            "version: 1\nallow: []\nagents:\n  coder:\n    allow: []\n    tools: [x]\n",
            "policy.yaml:6: agents.coder.tools: unknown key",
        ),
    ],
)
def test_shape_errors_name_the_line_and_key(text, expected):
    assert expected in error_of(text)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("allow: [tools.exec]", "policy.yaml:9: agents.coder.allow[0]: tools.exec widens"),
        ("allow: [skills.*]", "agents.coder.allow[0]: skills.* widens"),
        ("allow: [mcp.*]", "agents.coder.allow[0]: mcp.* widens"),
        ("domains: [example.com]", "agents.coder.domains[0]: example.com widens"),
        ("domains: [.com]", "agents.coder.domains[0]: .com widens"),
        ("paths: [/etc]", "agents.coder.paths[0]: /etc widens"),
        ("paths: [/srv/shared/../secret]", "agents.coder.paths[0]"),
        ("networks: [10.0.0.0/8]", "agents.coder.networks[0]: 10.0.0.0/8 widens"),
    ],
)
def test_a_per_agent_widening_is_an_error_on_its_line(section, expected):
    text = (
        "version: 1\n"
        "allow: [tools.read_file, skills.web, mcp.github.*]\n"
        "domains: [.example.com, api.other.org]\n"
        "paths: [., /srv/shared]\n"
        "networks: [10.1.0.0/16]\n"
        "# comment\n"
        "agents:\n"
        "  coder:\n"
        f"    {section}\n"
    )
    assert expected in error_of(text)


def test_per_agent_narrowing_is_accepted_and_applies_to_that_agent_only():
    policy = parse(
        """\
        version: 1
        allow: [tools.read_file, tools.write_file, net.http, skills.*, mcp.*]
        domains: [.example.com]
        paths: [., /srv/shared]
        networks: [10.0.0.0/8]
        agents:
          coder:
            allow: [tools.read_file, skills.lint, mcp.github.*]
            domains: [api.example.com, .eu.example.com]
            paths: [src, /srv/shared/docs]
            networks: [10.1.0.0/16]
        """
    )
    coder = lambda cap, subj="": policy.decide("coder", cap, subj, workspace=WS)  # noqa: E731
    other = lambda cap, subj="": policy.decide("other", cap, subj, workspace=WS)  # noqa: E731
    assert not coder("tools.write_file", "a").allowed
    assert other("tools.write_file", "a").allowed
    assert coder("skills.lint").allowed and not coder("skills.deploy").allowed
    assert coder("mcp.github.create_issue").allowed and not coder("mcp.slack.post").allowed
    assert coder("tools.read_file", "src/main.py").allowed
    assert not coder("tools.read_file", "README.md").allowed
    assert other("tools.read_file", "README.md").allowed
    assert coder("tools.read_file", "/srv/shared/docs/x").allowed
    assert not coder("tools.read_file", "/srv/shared/other").allowed
    # net.http is not in coder's own allow list: replacing a key replaces it whole.
    assert not coder("net.http", "https://api.example.com/").allowed
    assert policy.allowed_networks("coder") == (ipaddress.ip_network("10.1.0.0/16"),)
    assert policy.allowed_networks("other") == (ipaddress.ip_network("10.0.0.0/8"),)


def test_an_agent_section_inherits_the_keys_it_leaves_out():
    policy = parse(
        """\
        version: 1
        allow: [tools.read_file, net.http]
        domains: [example.com]
        paths: [.]
        agents:
          reader:
            allow: [net.http]
        """
    )
    assert policy.decide("reader", "net.http", "https://example.com/").allowed
    assert not policy.decide("reader", "tools.read_file", "a", workspace=WS).allowed


# -- default deny ----------------------------------------------------------------------


def test_a_missing_file_denies_everything(tmp_path):
    policy = load_policy(tmp_path / "policy.yaml", TOOLS)
    assert policy.missing
    for cap, subject in [
        ("tools.read_file", "a"),
        ("acp.read", ""),
        ("net.http", "https://example.com/"),
        ("skills.x", ""),
    ]:
        decision = policy.decide("default", cap, subject, workspace=WS)
        assert not decision.allowed
        assert decision.policy_version == policy.version


def test_empty_lists_allow_nothing():
    policy = parse("version: 1\nallow: []\ndomains: []\npaths: []\nnetworks: []\n")
    assert not policy.decide("a", "acp.read").allowed
    policy = parse("version: 1\nallow: [net.http, tools.read_file]\ndomains: []\npaths:\n")
    assert not policy.decide("a", "net.http", "https://example.com/").allowed
    assert not policy.decide("a", "tools.read_file", "x", workspace=WS).allowed
    assert policy.allowed_networks("a") == ()


def test_unknown_or_wildcard_capabilities_asked_for_are_denied_not_raised():
    policy = parse("version: 1\nallow: [skills.*]\n")
    assert not policy.decide("a", "skills.*").allowed
    assert "unknown capability" in policy.decide("a", "bogus").reason
    assert policy.decide("a", "skills.anything").allowed


def test_capabilities_without_subject_checks():
    policy = parse("version: 1\nallow: [acp.read, tools.exec, mcp.fs.read]\n")
    assert policy.decide(None, "acp.read").allowed
    assert not policy.decide(None, "acp.mutate").allowed
    assert policy.decide("a", "tools.exec", "rm -rf /").allowed
    assert policy.decide("a", "mcp.fs.read").allowed
    assert not policy.decide("a", "mcp.fs.write").allowed


# -- domains -------------------------------------------------------------------------


def test_domains_exact_host_versus_suffix():
    policy = parse(
        "version: 1\nallow: [net.http]\ndomains: [api.example.com, .example.org, 203.0.113.5]\n"
    )

    def ok(url: str) -> bool:
        return policy.decide("a", "net.http", url).allowed

    assert ok("https://api.example.com/v1")
    assert ok("http://API.Example.COM.:8080/x")
    assert not ok("https://www.example.com/")
    assert not ok("https://evilapi.example.com/")
    assert ok("https://docs.example.org/") and ok("https://a.b.example.org/")
    assert not ok("https://example.org/")  # a suffix is subdomains only
    assert not ok("https://notexample.org/")
    assert not ok("https://example.org.evil.com/")
    assert ok("http://203.0.113.5/")
    assert not ok("ftp://api.example.com/")
    assert not ok("not a url")
    assert not ok("https://api.example.com@evil.com/")  # userinfo does not fool it


# -- paths ---------------------------------------------------------------------------


def test_paths_are_prefixes_by_whole_components_after_normalisation():
    policy = parse(
        "version: 1\nallow: [tools.read_file, tools.list_dir]\npaths: [docs, /srv/data]\n"
    )

    def ok(subject: str, cap: str = "tools.read_file") -> bool:
        return policy.decide("a", cap, subject, workspace=WS).allowed

    assert ok("docs/a.md") and ok("docs") and ok("./docs/x/../y")
    assert ok(f"{WS}/docs/a.md")  # an absolute path inside the entry
    assert not ok("docs/../secret.txt")
    assert not ok("docsx/a")
    assert not ok("../ws/docs/../../etc/passwd")
    assert ok("/srv/data/x") and ok("/srv/data")
    assert not ok("/srv/database")
    assert not ok("/srv/data/../../etc/passwd")
    assert not ok("", cap="tools.list_dir")  # "" is the workspace itself, not listed
    reason = policy.decide("a", "tools.read_file", "docs/../secret.txt", workspace=WS).reason
    assert f"{WS}/secret.txt" in reason


def test_relative_paths_need_a_workspace():
    policy = parse("version: 1\nallow: [tools.read_file]\npaths: [.]\n")
    assert not policy.decide("a", "tools.read_file", "a.txt").allowed
    assert policy.decide("a", "tools.read_file", "a.txt", workspace=WS).allowed
    assert not policy.decide("a", "tools.read_file", "/etc/passwd", workspace=WS).allowed


def test_home_paths_expand(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    policy = parse("version: 1\nallow: [tools.read_file]\npaths: [~/notes]\n")
    assert policy.decide("a", "tools.read_file", "/home/someone/notes/x").allowed
    assert not policy.decide("a", "tools.read_file", "/home/someone/other").allowed


# -- versions ------------------------------------------------------------------------


def test_version_changes_with_content_only():
    a = parse("version: 1\nallow: [tools.read_file, acp.read]\n")
    b = parse("# a comment\nversion: 1\nallow:\n  - acp.read\n  - tools.read_file\n")
    c = parse("version: 1\nallow: [tools.read_file]\n")
    assert a.version == b.version
    assert a.version != c.version
    assert len(a.version) == 12
    assert a.decide("x", "acp.read").policy_version == a.version


def test_the_default_policy_init_writes_loads_and_fits_the_default_agent():
    policy = parse_policy(DEFAULT_POLICY, "policy.yaml")  # the tools a worker knows
    for cap in ("tools.read_file", "tools.write_file", "tools.list_dir"):
        assert policy.decide("default", cap, "notes.txt", workspace=WS).allowed
    for cap in ("tools.skill_read", "skills.text_stats", "skills.tally"):
        assert policy.decide("default", cap, "").allowed
    assert not policy.decide("default", "skills.url_check", "").allowed
    assert not policy.decide("default", "tools.exec", "ls", workspace=WS).allowed
    assert not policy.decide("default", "net.http", "https://example.com/").allowed
    assert not policy.decide("default", "tools.read_file", "/etc/passwd", workspace=WS).allowed


def test_known_tools_default_to_the_builtin_ones():
    policy = parse_policy("version: 1\nallow: [tools.web_fetch]\n")
    assert policy.decide("a", "tools.web_fetch", "https://x/").allowed
    with pytest.raises(PolicyError, match="unknown tool capability"):
        parse_policy("version: 1\nallow: [tools.teleport]\n")


# -- approval modes ---------------------------------------------------------------------


def test_approval_modes_default_to_allowlist_and_merge_per_agent():
    policy = parse(
        """\
        version: 1
        allow: [tools.exec, tools.write_file, tools.read_file]
        approvals: {exec: ask}
        approval_timeout: 90s
        agents:
          careful:
            approvals: {write_file: ask, exec: deny}
          plain: {}
        """
    )
    assert policy.approval_timeout == 90
    assert policy.approval_mode("other", "exec") == "ask"
    assert policy.approval_mode("other", "read_file") == "allowlist"
    assert policy.approval_mode("careful", "exec") == "deny"
    assert policy.approval_mode("careful", "write_file") == "ask"
    assert policy.approval_mode("plain", "exec") == "ask"  # inherited, not dropped


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "version: 1\napprovals:\n  teleport: ask\n",
            "policy.yaml:3: approvals.teleport: unknown tool",
        ),
        (
            "version: 1\napprovals:\n  exec: maybe\n",
            "policy.yaml:3: approvals.exec: must be one of",
        ),
        ("version: 1\napprovals: [exec]\n", "policy.yaml:2: approvals: must be a mapping"),
        (
            "version: 1\napprovals: {exec: ask}\nagents:\n  a:\n    approvals: {exec: allowlist}\n",
            "policy.yaml:5: agents.a.approvals.exec: allowlist widens the global policy's ask",
        ),
        ("version: 1\napproval_timeout: soon\n", "policy.yaml:2: approval_timeout:"),
        ("version: 1\napproval_timeout: 0s\n", "must be more than zero"),
        ("version: 1\napproval_timeout: -5\n", "policy.yaml:2: approval_timeout:"),
    ],
)
def test_approval_errors_name_the_line(text, expected):
    assert expected in error_of(text)


def test_durations():
    from goclaw.policy import parse_duration

    assert [parse_duration(v) for v in (90, "90", "90s", "10m", "1.5h", "1d")] == [
        90,
        90,
        90,
        600,
        5400,
        86400,
    ]
    for bad in ("", "m", "10 minutes", True, None, "inf"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_approval_settings_change_the_version():
    base = "version: 1\nallow: [tools.exec]\n"
    versions = {
        parse(base).version,
        parse(base + "approvals: {exec: ask}\n").version,
        parse(base + "approvals: {exec: ask}\napproval_timeout: 5m\n").version,
    }
    assert len(versions) == 3
