"""A demo build is reproducible: the `ci` recipe, built by this test session, gives exactly the bytes that
tests/fixtures/demo_ci_manifest.json recorded (`easygen demo verify`), and a build records what happened
(its command, seconds per stage, commit, versions, threads), which `easygen demo ship` copies into the manifest.
The fixture's bytes hold only on a machine like the one that recorded it (thread count, CPU kernels, library
versions); a second ci build, compared with the session's, checks reproducibility on any machine.

The fixture is regenerated when a change to the training code changes the ci build's weights (one thread,
as tests/conftest.py runs the suite: the thread count changes the float bytes):
    OMP_NUM_THREADS=1 easygen demo build --recipe ci --out /tmp/ci && easygen demo ship --model /tmp/ci \\
        --dest /tmp/ci-shipped --no-eval && cp /tmp/ci-shipped/MANIFEST.json tests/fixtures/demo_ci_manifest.json
"""
import json
from pathlib import Path

import pytest

from easygen.cli import main
from easygen.demo.build_record import environment
from easygen.demo.recipe import STAGES
from easygen.demo.shipped import ship

FIXTURE = Path(__file__).parent / "fixtures" / "demo_ci_manifest.json"
# Float results on CPU depend on these; elsewhere the bytes may legitimately differ.
SAME_MACHINE = ("versions", "threads", "cpu_capability")


def _recorded() -> dict:
    return json.loads(FIXTURE.read_text())


def _skip_unless_same_machine():
    recorded, here = _recorded()["build"], environment()
    differ = [f"{k}: {recorded[k]} there, {here[k]} here" for k in SAME_MACHINE if recorded[k] != here[k]]
    if differ:
        pytest.skip("the recorded ci build ran elsewhere, so its float bytes need not match: " + "; ".join(differ))


def test_the_ci_recipe_rebuilds_to_the_recorded_sha256(ci_demo, capsys):
    _skip_unless_same_machine()
    code = main(["demo", "verify", "--manifest", str(FIXTURE), "--model", str(ci_demo.root)])
    out = capsys.readouterr().out
    assert code == 0, f"the ci build differs from its recorded sha256 (regenerate the fixture if the training " \
                      f"code changed on purpose; see this module's docstring):\n{out}"
    assert f"all {len(_recorded()['sha256'])} files identical" in out


def test_a_second_ci_build_on_this_machine_gives_the_same_bytes(ci_demo, tmp_path, capsys):
    """Bit-reproducible here, whatever this machine's CPU (the test above runs only where the fixture was
    recorded): the session's ci build, shipped, against a second build of the ci recipe in another folder."""
    from easygen.demo.recipe import build
    ship(ci_demo, tmp_path / "shipped", dtype="float16", log=lambda line: None, run_eval=False, command="ship")
    again = build(tmp_path / "again", "ci", log=lambda line: None)
    code = main(["demo", "verify", "--manifest", str(tmp_path / "shipped" / "MANIFEST.json"), "--model", str(again.root)])
    out = capsys.readouterr().out
    assert code == 0 and "files identical" in out, f"two ci builds on one machine differ:\n{out}"


def test_verify_names_the_file_that_differs(ci_demo, tmp_path, capsys):
    doc = _recorded()
    weight = "bidiffuser/uvit.safetensors"
    doc["sha256"][weight] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    code = main(["demo", "verify", "--manifest", str(tmp_path / "manifest.json"), "--model", str(ci_demo.root)])
    assert code == 1 and f"changed: {weight}" in capsys.readouterr().out


def test_a_build_records_what_happened_and_ship_copies_it(ci_demo, tmp_path):
    record = json.loads(ci_demo.manifest.read_text())["build"]
    assert list(record["seconds"]) == [name for name, _, _ in STAGES] and record["stages_run_earlier"] == []
    assert record["command"] is None  # built from Python, not typed
    assert record["threads"] >= 1 and record["versions"]["torch"] and record["cpu_capability"]
    doc = ship(ci_demo, tmp_path / "shipped", dtype="float16", log=lambda line: None, run_eval=False,
               command="easygen demo ship --model X --no-eval")
    assert doc["build"] == record and doc["commands"] == ["easygen demo ship --model X --no-eval"]
    assert "build" not in json.loads((tmp_path / "shipped" / "demo.json").read_text())  # no timings in the files


def test_the_fixture_is_one_uninterrupted_build_of_the_ci_recipe():
    from easygen.demo.recipe import RECIPES
    doc = _recorded()
    assert doc["recipe"] == RECIPES["ci"].to_json(), "the ci recipe changed: regenerate the fixture"
    assert doc["build"]["stages_run_earlier"] == [] and doc["build"]["command"].startswith("easygen demo build")
