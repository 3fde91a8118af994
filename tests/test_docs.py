"""The user-facing documents hold: the Sphinx docs build with warnings as errors, the production
example master.cfg passes ``buildbot checkconfig`` offline, the documented IAM policy grants exactly
what the plugin needs, and the README gives the two set-up commands."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
HYBRID_CFG = REPO / "master_examples" / "hybrid.cfg"
POOL_TAG_CONDITION = "ec2:ResourceTag/buildbot-ec2-hybrid:pool"

# hybrid.cfg's pools; the policy's tag condition must cover them
HYBRID_POOLS = {"b2g-aws", "try-aws"}


def _offline_env() -> dict[str, str]:
    """Environment for child processes that must not be able to reach AWS at all."""
    env = dict(os.environ)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                "https_proxy"):
        env.pop(var, None)
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ACCESS_KEY_ID="bogus-key-id",
        AWS_SECRET_ACCESS_KEY="bogus-secret",
        AWS_DEFAULT_REGION="us-west-2",
        # An endpoint nothing listens on: any EC2 call made while loading the config would fail
        # loudly instead of reaching AWS.
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


def _venv_tool(name: str) -> str:
    # sys.executable is not resolved: a venv's python is a symlink out of the venv.
    tool = Path(sys.executable).parent / name
    if not tool.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}")
    return str(tool)


# -- Sphinx ------------------------------------------------------------------------------------


def test_docs_build_with_warnings_as_errors(tmp_path):
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip(
            "sphinx is not installed; add 'sphinx>=7' to the test extra in setup.py "
            "(pip install sphinx) to build docs/ with warnings as errors"
        )
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        # docs/conf.py is executed: leave no __pycache__ in the source tree
        env={**_offline_env(), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout}\n{proc.stderr}"
    for page in ("index", "quickstart", "configuration", "instances", "hibernation", "iam",
                 "operations", "troubleshooting", "architecture", "sandbox"):
        assert (out / f"{page}.html").is_file(), f"{page}.html was not built"
    # the IAM page shows the very policy file the next test checks
    iam_html = (out / "iam.html").read_text(encoding="utf-8")
    assert "buildbot-ec2-hybrid:pool" in iam_html and "ec2:StopInstances" in iam_html


def test_every_page_is_in_the_toctree():
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    entries = {line.strip() for line in index.splitlines() if line.startswith("   ")}
    pages = {p.stem for p in DOCS.glob("*.rst")} - {"index"}
    missing = sorted(pages - entries)
    assert not missing, f"pages not linked from index.rst: {missing}"
    assert "performance" in entries, "docs/performance.rst must be in the toctree"


# -- the production example ----------------------------------------------------------------------


def test_hybrid_cfg_passes_checkconfig_offline(tmp_path):
    master = tmp_path / "master"
    master.mkdir()
    shutil.copy(HYBRID_CFG, master / "master.cfg")
    # SecretInAFile checks that its directory exists; it does not read the secrets at checkconfig
    (master / "secrets").mkdir(mode=0o700)
    proc = subprocess.run(
        [_venv_tool("buildbot"), "checkconfig", "master.cfg"],
        cwd=master,
        capture_output=True,
        text=True,
        timeout=120,
        env=_offline_env(),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"buildbot checkconfig failed:\n{output}"
    assert "Config file is good!" in output


def test_checkconfig_of_hybrid_cfg_can_fail(tmp_path):
    """The check above is real: the same file with one pool argument broken is refused."""
    master = tmp_path / "master"
    master.mkdir()
    text = HYBRID_CFG.read_text(encoding="utf-8")
    assert text.count('vpc_id="vpc-0123456789abcdef0"') >= 1
    (master / "master.cfg").write_text(
        text.replace('vpc_id="vpc-0123456789abcdef0"', 'vpc_id="vpc-nothex"', 1), encoding="utf-8"
    )
    (master / "secrets").mkdir(mode=0o700)
    proc = subprocess.run(
        [_venv_tool("buildbot"), "checkconfig", "master.cfg"],
        cwd=master,
        capture_output=True,
        text=True,
        timeout=120,
        env=_offline_env(),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "vpc_id" in output and "vpc-nothex" in output


def test_hybrid_cfg_shapes_the_documented_farm(tmp_path):
    """Loaded in-process: overflow builders, a never-overflowing Windows builder, separate pools,
    secrets from a provider, and no EC2 client made while loading."""
    from buildbot.config.master import FileLoader

    from buildbot_ec2_hybrid import EC2Pool
    from buildbot_ec2_hybrid import ec2

    shutil.copy(HYBRID_CFG, tmp_path / "master.cfg")
    (tmp_path / "secrets").mkdir(mode=0o700)
    clients_before = dict(ec2.EC2Client._shared)
    cfg = FileLoader(str(tmp_path), "master.cfg").loadConfig()
    assert ec2.EC2Client._shared == clients_before, "loading master.cfg made an EC2 client"

    pools = {s.name: s for s in cfg.services.values() if isinstance(s, EC2Pool)}
    assert set(pools) == HYBRID_POOLS
    release, trypool = pools["b2g-aws"], pools["try-aws"]
    assert not set(release.workernames) & set(trypool.workernames), "pools share workers"

    builders = {b.name: set(b.workernames) for b in cfg.builders}
    for name in ("b2g_emulator_build", "b2g_device_build", "android_build"):
        assert set(release.workernames) <= builders[name], f"{name} does not overflow"
        assert not builders[name] & set(trypool.workernames)
    for name in ("try_b2g_build", "try_android_build"):
        assert set(trypool.workernames) <= builders[name], f"{name} does not overflow"
        assert not builders[name] & set(release.workernames), f"{name} reaches release"
    all_pool = set(release.workernames) | set(trypool.workernames)
    for name in ("win64_build", "linux64_build"):
        assert not builders[name] & all_pool, f"{name} must never overflow"
    assert cfg.secretsProviders, "hybrid.cfg should take its secrets from a provider"


# -- the IAM policy -----------------------------------------------------------------------------


def _actions(statement: dict) -> set[str]:
    actions = statement.get("Action", [])
    return {actions} if isinstance(actions, str) else set(actions)


def test_iam_policy_allows_exactly_describe_start_stop_on_tagged_instances():
    policy = json.loads((DOCS / "iam-policy.json").read_text(encoding="utf-8"))
    assert policy["Version"] == "2012-10-17"
    statements = policy["Statement"]
    assert all(s["Effect"] == "Allow" for s in statements), "the policy only grants"
    assert not any("NotAction" in s or "NotResource" in s for s in statements)

    granted = set().union(*(_actions(s) for s in statements))
    assert not any("*" in a for a in granted), f"wildcard action granted: {granted}"
    assert {"ec2:DescribeInstances", "ec2:StartInstances", "ec2:StopInstances"} <= granted
    assert granted <= {
        "ec2:DescribeInstances",
        "ec2:DescribeInstanceStatus",
        "ec2:StartInstances",
        "ec2:StopInstances",
    }, f"more than describe/start/stop granted: {granted}"
    for forbidden in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags"):
        assert forbidden not in granted

    for statement in statements:
        actions = _actions(statement)
        if actions & {"ec2:StartInstances", "ec2:StopInstances"}:
            assert actions <= {"ec2:StartInstances", "ec2:StopInstances"}
            resources = statement["Resource"]
            resources = [resources] if isinstance(resources, str) else resources
            assert all(r.startswith("arn:aws:ec2:") and ":instance/" in r for r in resources)
            condition = statement["Condition"]["StringEquals"][POOL_TAG_CONDITION]
            values = {condition} if isinstance(condition, str) else set(condition)
            assert values == HYBRID_POOLS, "the policy's pools should match hybrid.cfg"


# -- the README ---------------------------------------------------------------------------------


def test_readme_gives_the_set_up_commands_and_the_api():
    readme = (REPO / "README.rst").read_text(encoding="utf-8")
    assert "make demo" in readme
    assert "make test" in readme
    assert "http://127.0.0.1:8010" in readme
    for needle in ("EC2Pool(", "aws.builder(", "overflow=True", 'c["services"] = [aws]',
                   'c["workers"] = inhouse_workers + aws.workers'):
        assert needle in readme, needle
    # every docs/ page the README links to exists
    for line in readme.splitlines():
        if "<docs/" in line:
            target = line.split("<docs/", 1)[1].split(">", 1)[0]
            assert (DOCS / target).is_file(), f"README links to missing docs/{target}"
