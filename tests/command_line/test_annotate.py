"""dials.cnn_annotate drives the real dials.image_viewer under a virtual X server.

Each GUI test runs this file as a script in a fresh process (wx and GTK hold process-wide state
and die with their X server): the script opens ``dials.cnn_annotate`` exactly as a user would,
presses keys and buttons with ``wx.UIActionSimulator`` (real X input events through XTest) or
the viewer's own controls, and records the panel and the annotation file after every action.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

ACTION_TIMEOUT_S = 20  # generous: the CI machine has 2 shared cores
DRIVER_LIMIT_S = 150


# --- the driver (runs in the child process) -------------------------------------------------------
def _drive(arguments, actions, log_path):
    """Run ``dials.cnn_annotate arguments``, perform ``actions`` in its window, log the state after each."""
    import traceback

    import wx

    app = wx.App()
    from dials_cnn.command_line.annotate import run
    from dials_cnn.viewer_plugin import AnnotationFrame

    log = {"steps": [], "errors": []}
    output = next(a.split("=", 1)[1] for a in arguments if a.startswith("output="))
    simulator = wx.UIActionSimulator()
    pending = list(actions)

    def record_error(kind, value, tb):
        log["errors"].append("".join(traceback.format_exception(kind, value, tb)))

    sys.excepthook = record_error  # wx reports handler exceptions here and carries on

    def find_frame():
        return next((w for w in wx.GetTopLevelWindows() if isinstance(w, AnnotationFrame)), None)

    def state(frame):
        panel = frame.scoring_panel
        text = open(output).read() if os.path.exists(output) else None
        return {
            "position": frame.images.selected_index,
            "viewer_key": str(frame.images.selected),
            "label": panel.label_text.GetLabel(),
            "image": panel.image_text.GetLabel(),
            "progress": panel.progress_text.GetLabel(),
            "model": panel.model_text.GetLabel(),
            "message": panel.message_text.GetLabel(),
            "order": panel.order_choice.GetStringSelection() if panel.order_choice else None,
            "zoom_level": frame.pyslip.level,
            "brightness": frame.settings.brightness,
            "score_tool_open": bool(frame._score_frame),
            "file": text,
        }

    def click(window):
        x, y = window.GetScreenPosition()
        width, height = window.GetSize()
        simulator.MouseMove(x + width // 2, y + height // 2)
        wx.Yield()
        wx.MilliSleep(100)
        wx.Yield()
        simulator.MouseClick()

    def perform(frame, action):
        kind, *value = action
        panel = frame.scoring_panel
        if kind == "key":
            if not frame.IsActive():  # another tool window has the keyboard: click into the viewer first
                click(panel.label_text)
            simulator.Char(ord(value[0]))
        elif kind == "click":
            target = {"undo": panel.undo_button, "first_unscored": panel.first_unscored_button}
            click(target.get(value[0]) or panel.buttons[value[0]])
        elif kind == "viewer_next":  # the viewer's own toolbar arrow
            wx.PostEvent(frame, wx.CommandEvent(wx.wxEVT_MENU, wx.ID_FORWARD))
        elif kind == "viewer_jump":  # type into the viewer's own "Jump:" field, then Enter
            frame.jump_to_image.SetFocus()
            frame.jump_to_image.SelectAll()
            for character in value[0]:
                simulator.Char(ord(character))
            simulator.Char(wx.WXK_RETURN)
        elif kind == "zoom":
            frame.pyslip.ZoomToLevel(frame.pyslip.level + 1)
        elif kind == "brightness":
            control = frame.settings_frame.panel.brightness_ctrl
            control.SetValue(value[0])
            event = wx.CommandEvent(wx.wxEVT_SLIDER, control.GetId())
            event.SetEventObject(control)
            wx.PostEvent(control, event)
        elif kind == "score_tool":  # the viewer's own Actions > Show score tool
            frame.OnScore(None)
        elif kind == "order":  # the panel's order menu
            from dials_cnn.viewer_plugin import ORDER_NAMES

            panel.order_choice.SetSelection(list(ORDER_NAMES).index(value[0]))
            event = wx.CommandEvent(wx.wxEVT_CHOICE, panel.order_choice.GetId())
            event.SetEventObject(panel.order_choice)
            wx.PostEvent(panel.order_choice, event)
        else:
            raise ValueError(action)

    def next_action():
        frame = find_frame()
        if not pending:
            frame.Close()
            return
        action = pending.pop(0)
        before = state(frame)
        try:
            perform(frame, action)
        except Exception:
            record_error(*sys.exc_info())
        wait_for_change(action, before, time.monotonic())

    def wait_for_change(action, before, started):
        frame = find_frame()
        now = state(frame)
        # Event delivery is asynchronous: wait until the action shows (or, for actions meant to
        # change nothing visible, a short settle time) before recording and moving on.
        settle = 1.0 if action[0] in ("zoom", "brightness", "score_tool") else ACTION_TIMEOUT_S
        if now == before and time.monotonic() - started < settle:
            wx.CallLater(50, wait_for_change, action, before, started)
            return
        log["steps"].append({"action": action, "state": now, "seconds": time.monotonic() - started})
        wx.CallAfter(next_action)

    def start(started=time.monotonic()):
        frame = find_frame()
        if frame is None or frame.images.selected_index is None or not frame.IsShown():
            if time.monotonic() - started < 60:
                wx.CallLater(100, start, started)
            return
        log["steps"].append({"action": ["start"], "state": state(frame)})
        next_action()

    def give_up():
        # A modal dialog or lost event would hang the test; leave a log that says where it stopped.
        log["errors"].append(f"driver gave up after {DRIVER_LIMIT_S} s; steps done: {len(log['steps'])}")
        with open(log_path, "w") as handle:
            json.dump(log, handle, indent=1)
        os._exit(3)

    watchdog = threading.Timer(DRIVER_LIMIT_S, give_up)
    watchdog.daemon = True
    watchdog.start()
    wx.CallAfter(start)
    try:
        run(arguments)
    except SystemExit as error:
        log["exit"] = str(error)
    watchdog.cancel()
    with open(log_path, "w") as handle:
        json.dump(log, handle, indent=1)


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def display():
    """A private Xvfb; the number comes from Xvfb itself (-displayfd), so parallel runs cannot clash.

    -noreset: by default the server resets when its last client leaves, and a test starting then is refused.
    """
    if not shutil.which("Xvfb"):
        pytest.fail("Xvfb is not installed; run `make env` (Debian package xvfb).")
    read_end, write_end = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1400x1000x24", "-nolisten", "tcp", "-noreset"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    number = b""
    while not number.endswith(b"\n"):
        chunk = os.read(read_end, 16)
        if not chunk:
            pytest.fail("Xvfb did not start")
        number += chunk
    os.close(read_end)
    yield ":" + number.decode().strip()
    server.terminate()
    server.wait(timeout=30)


def write_cbf_images(folder, count, size=128):
    """``count`` small single-image CBFs with ``2 * i`` bright 3x3 spots on Poisson background."""
    import numpy as np
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model.beam import BeamFactory
    from dxtbx.model.detector import DetectorFactory
    from scitbx.array_family import flex

    detector = DetectorFactory.simple(
        "PAD", 50.0, (size * 0.05, size * 0.05), "+x", "-y", (0.1, 0.1), (size, size), (-1, 1e6)
    )
    beam = BeamFactory.simple(1.0)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(count):
        pixels = rng.poisson(3, (size, size)).astype(np.int32)
        for y, x in rng.integers(4, size - 4, (2 * i, 2)):
            pixels[y - 1 : y + 2, x - 1 : x + 2] += 400
        path = os.path.join(folder, f"shot_{i + 1:03d}.cbf")
        FormatCBFMini.as_file(detector, beam, None, None, flex.int(pixels), path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def cbf_run(tmp_path_factory):
    """Six one-image CBFs imported into an experiment list, as dials.import writes it."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    folder = tmp_path_factory.mktemp("cbf_run")
    paths = write_cbf_images(str(folder), 6)
    experiments = ExperimentListFactory.from_filenames(paths)
    experiments.as_file(str(folder / "imported.expt"))
    return folder


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    """Four simulated Rayonix stills in one HDF5 file (the project's idh5 layout), imported by dials.import."""
    from dials_cnn.simulate import simulate_run

    folder = tmp_path_factory.mktemp("simulated_run")
    simulate_run("LO19", 4, 5, str(folder), layout="idh5")
    result = subprocess.run(
        ["dials.import", "LO19_seed5.h5"], cwd=folder, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


def annotate(display, folder, arguments, actions):
    """Run dials.cnn_annotate in ``folder`` under ``display`` with scripted actions; return the log."""
    log_path = os.path.join(folder, f"drive_{time.monotonic_ns()}.json")
    environment = dict(os.environ, DISPLAY=display, OMP_NUM_THREADS="1", NO_AT_BRIDGE="1")
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), json.dumps(arguments), json.dumps(actions), log_path],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=DRIVER_LIMIT_S + 60,
    )
    log = {"errors": ["the driver wrote no log"]}
    if os.path.exists(log_path):
        with open(log_path) as handle:
            log = json.load(handle)
    assert log["errors"] == [], "\n".join(log["errors"]) + result.stdout[-2000:] + result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [step["action"] for step in log["steps"]] == [["start"]] + [list(a) for a in actions]
    return log


def lines(text):
    return [] if text is None else text.splitlines()


# --- tests -----------------------------------------------------------------------------------------
def test_keys_buttons_undo_and_viewer_tools(display, cbf_run, tmp_path):
    from dials_cnn.annotations import read_annotations, resolve_path

    output = tmp_path / "expert_annotation.txt"
    actions = [
        ("key", "j"),
        ("click", "MAYBE"),
        ("key", "l"),
        ("key", "u"),
        ("click", "HIT"),
        ("click", "undo"),
        ("key", "l"),
        ("viewer_next",),
        ("zoom",),
        ("brightness", 40),
        ("viewer_jump", "6"),
        ("score_tool",),
        ("score_tool",),  # toggles it closed again
        ("click", "first_unscored"),
        ("key", "k"),
    ]
    log = annotate(display, str(cbf_run), ["imported.expt", f"output={output}"], actions)
    states = [step["state"] for step in log["steps"]]
    relative = os.path.relpath(cbf_run, tmp_path)

    def line(number, label):
        return f"{relative}/shot_{number:03d}.cbf [1] {label}"

    start, j, maybe, l, u, hit, undo, l2, next_, zoom, bright, jump, score_tool, score_tool_closed, first, k = states
    assert start["position"] == 0 and start["file"] is None
    assert start["progress"] == "Scored 0 / 6" and start["label"] == "—"
    # each score writes the whole file and advances
    assert lines(j["file"]) == [line(1, "HIT")] and j["position"] == 1
    assert lines(maybe["file"]) == [line(1, "HIT"), line(2, "MAYBE")] and maybe["position"] == 2
    assert lines(l["file"])[-1] == line(3, "MISS") and l["position"] == 3 and l["progress"] == "Scored 3 / 6"
    # undo takes the last score back and shows that image again
    assert lines(u["file"]) == [line(1, "HIT"), line(2, "MAYBE")] and u["position"] == 2
    assert u["label"] == "—" and u["progress"] == "Scored 2 / 6"
    assert lines(hit["file"])[-1] == line(3, "HIT") and hit["position"] == 3
    assert lines(undo["file"]) == lines(u["file"]) and undo["position"] == 2
    assert lines(l2["file"])[-1] == line(3, "MISS") and l2["position"] == 3
    # the viewer's own navigation and tools still work, and the panel follows the viewer
    assert next_["position"] == 4 and next_["image"].endswith("shot_005.cbf [1]") and next_["label"] == "—"
    assert zoom["zoom_level"] == next_["zoom_level"] + 1
    assert bright["brightness"] == 40
    assert score_tool["score_tool_open"] and not score_tool_closed["score_tool_open"]
    assert jump["position"] == 5 and jump["file"] == l2["file"] and jump["image"].endswith("shot_006.cbf [1]")
    # jump to the first unscored image, score it
    assert first["position"] == 3 and first["viewer_key"] == "shot_004.cbf [4]"
    assert k["position"] == 4 and lines(k["file"])[-1] == line(4, "MAYBE")  # keys score after "Jump:" too

    # the file is what the trainer reads
    records = read_annotations(str(output))
    assert [(os.path.basename(r.path), r.index, r.label) for r in records] == [
        ("shot_001.cbf", 0, "HIT"),
        ("shot_002.cbf", 0, "MAYBE"),
        ("shot_003.cbf", 0, "MISS"),
        ("shot_004.cbf", 0, "MAYBE"),
    ]
    assert all(os.path.exists(resolve_path(str(output), r.path)) for r in records)
    assert [p.name for p in tmp_path.iterdir()] == ["expert_annotation.txt"]  # no temporary files left


def test_restart_resumes_without_losing_or_duplicating_lines(display, cbf_run):
    from dials_cnn.annotations import read_annotations

    output = cbf_run / "expert_annotation.txt"  # beside the images: bare file names, as fv5080
    output.write_text("# scored by A. Expert\nother_run.h5 [7] HIT\nshot_002.cbf [1] MISS\n")

    first = annotate(display, str(cbf_run), ["imported.expt", "output=expert_annotation.txt"], [("key", "j"), ("key", "k")])
    start, j, k = (step["state"] for step in first["steps"])
    assert start["position"] == 0 and start["progress"] == "Scored 1 / 6"
    assert j["position"] == 1 and j["label"] == "MISS"  # shows the label already in the file
    assert k["position"] == 2
    assert lines(k["file"]) == [
        "# scored by A. Expert",
        "other_run.h5 [7] HIT",
        "shot_001.cbf [1] HIT",
        "shot_002.cbf [1] MAYBE",  # re-scored in place, not a second line
    ]

    # Restart: resumes at the first unscored image; undo does not reach into the last session.
    actions = [("key", "u"), ("key", "l"), ("key", "l"), ("key", "l"), ("key", "l")]
    second = annotate(display, str(cbf_run), ["imported.expt", "output=expert_annotation.txt"], actions)
    start, undo, *scores = (step["state"] for step in second["steps"])
    assert start["position"] == 2 and start["progress"] == "Scored 2 / 6"
    assert undo["message"] == "Nothing to undo in this session." and undo["file"] == k["file"]
    assert [s["position"] for s in scores] == [3, 4, 5, 5]
    assert scores[-1]["progress"] == "Scored 6 / 6"
    assert "all images are scored" in scores[-1]["message"]

    records = read_annotations(str(output))
    assert [(r.path, r.index, r.label) for r in records] == [
        ("other_run.h5", 6, "HIT"),
        ("shot_001.cbf", 0, "HIT"),
        ("shot_002.cbf", 0, "MAYBE"),
        ("shot_003.cbf", 0, "MISS"),
        ("shot_004.cbf", 0, "MISS"),
        ("shot_005.cbf", 0, "MISS"),
        ("shot_006.cbf", 0, "MISS"),
    ]
    assert output.read_text().startswith("# scored by A. Expert\n")

    # Everything scored: a restart opens at the first image and says so.
    third = annotate(display, str(cbf_run), ["imported.expt", "output=expert_annotation.txt"], [])
    assert third["steps"][0]["state"]["position"] == 0
    assert "All images are scored" in third["steps"][0]["state"]["message"]
    output.unlink()


def test_simulated_hdf5_run(display, simulated_run):
    """Stills in one HDF5 file: the lines use the image's index in the file, as the simulator's own file does."""
    from dials_cnn.annotations import read_annotations

    actions = [("key", "j"), ("key", "l"), ("key", "k"), ("key", "l")]
    log = annotate(display, str(simulated_run), ["imported.expt", "output=mine.txt"], actions)
    states = [step["state"] for step in log["steps"]]
    assert [s["position"] for s in states] == [0, 1, 2, 3, 3]
    assert [s["image"] for s in states[:4]] == [f"Image {i}: LO19_seed5.h5 [{i}]" for i in range(1, 5)]
    assert lines(states[-1]["file"]) == [
        "LO19_seed5.h5 [1] HIT",
        "LO19_seed5.h5 [2] MISS",
        "LO19_seed5.h5 [3] MAYBE",
        "LO19_seed5.h5 [4] MISS",
    ]
    # the same images, by the same keys, as the simulator's expert_annotation.txt (the trainer's input)
    ours = [(r.path, r.index) for r in read_annotations(str(simulated_run / "mine.txt"))]
    simulated = [(r.path, r.index) for r in read_annotations(str(simulated_run / "expert_annotation.txt"))]
    assert ours == simulated
    # and dials.cnn_train learns from the expert's file as it is
    train = subprocess.run(
        ["dials.cnn_train", "imported.expt", "annotations=mine.txt", "output.model=from_viewer.pt",
         "architecture=spotnet", "preprocess.pipeline=native", "preprocess.crop=64", "preprocess.bin=2",
         "training.epochs=1", "training.batches_per_epoch=1", "training.batch_size=2", "training.max_shift=4",
         "nthreads=1"],
        cwd=simulated_run, capture_output=True, text=True, timeout=300,
    )
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    from dials_cnn.model import load_model

    assert load_model(str(simulated_run / "from_viewer.pt")).provenance["images"] == 4


@pytest.fixture(scope="module")
def untrained_model(simulated_run):
    """A real model file with the paper's network, seeded He-initialised weights (no training needed
    to check that the viewer shows and orders by the model's own numbers)."""
    import torch

    from dials_cnn.model import build_network, save_model
    from dials_cnn.preprocess import PreprocessParams

    torch.manual_seed(3)
    path = simulated_run / "untrained.pt"
    save_model(str(path), build_network("ke2018"), "ke2018", PreprocessParams())
    return path


def test_model_probabilities_and_most_uncertain_first(display, simulated_run, untrained_model):
    from dials_cnn.classify import classify_experiments
    from dials_cnn.model import load_model
    from dxtbx.model.experiment_list import ExperimentList

    # What dials.cnn_classify's engine says about these images, computed here independently.
    classification = classify_experiments(
        ExperimentList.from_file(str(simulated_run / "imported.expt")), load_model(str(untrained_model))
    )
    expected = [record.probabilities for record in classification.records]
    margins = [abs(hit + maybe - miss) for hit, maybe, miss in expected]
    uncertain_first = sorted(range(4), key=lambda i: margins[i])
    assert len(set(margins)) == 4  # a strict order to check against

    output = simulated_run / "guided.txt"
    arguments = ["imported.expt", f"model={untrained_model.name}", "order=uncertain", f"output={output.name}"]
    actions = [("key", "j"), ("key", "l"), ("order", "run"), ("key", "k")]
    log = annotate(display, str(simulated_run), arguments, actions)
    start, first, second, run_order, third = (step["state"] for step in log["steps"])

    assert start["order"] == "Most uncertain first" and run_order["order"] == "Run order"
    assert [start["position"], first["position"], second["position"]] == uncertain_first[:3]
    for state in (start, first, second):
        hit, maybe, miss = expected[state["position"]]
        assert state["model"] == f"CNN: HIT {hit:.2f}  MAYBE {maybe:.2f}  MISS {miss:.2f}"
    # back to run order: the first image without a label
    unscored = sorted(set(range(4)) - set(uncertain_first[:2]))
    assert run_order["position"] == unscored[0]
    assert third["position"] == unscored[1]
    labels = {uncertain_first[0]: "HIT", uncertain_first[1]: "MISS", unscored[0]: "MAYBE"}
    assert lines(third["file"]) == [f"LO19_seed5.h5 [{i + 1}] {labels[i]}" for i in sorted(labels)]


def run_with_display(monkeypatch, display, folder, *arguments):
    """Run the command in this process for an error it stops with before any window opens.

    (Under pytest, DIALS' error handler re-raises Sorry instead of printing it and exiting 1.)
    """
    from dials.util import Sorry

    from dials_cnn.command_line.annotate import run

    monkeypatch.chdir(folder)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if display is None:
        monkeypatch.delenv("DISPLAY", raising=False)
    else:
        monkeypatch.setenv("DISPLAY", display)
    with pytest.raises(Sorry) as stopped:
        run(list(arguments))
    return str(stopped.value)


def run_without_display(monkeypatch, folder, *arguments):
    return run_with_display(monkeypatch, None, folder, *arguments)


def test_bad_annotation_file_is_one_clear_error(cbf_run, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("shot_001.cbf [1] HIT\nshot_001.cbf [1] MISS\nshot_002.cbf [0] PERHAPS\n")
    # as the user sees it: the installed command, a message, exit status 1, no traceback
    result = subprocess.run(
        ["dials.cnn_annotate", "imported.expt", f"output={bad}"], cwd=cbf_run, capture_output=True, text=True, timeout=120
    )
    message = result.stdout + result.stderr
    assert result.returncode == 1
    assert str(bad) in message and "duplicate of line 1" in message and "unknown label 'PERHAPS'" in message
    assert "Traceback" not in message and "During handling" not in message
    assert bad.read_text().startswith("shot_001.cbf [1] HIT\n")  # left untouched


def test_bad_model_file_is_one_clear_error(display, simulated_run, tmp_path, monkeypatch):
    bad = tmp_path / "not_a_model.pt"
    bad.write_text("hello")
    output = tmp_path / "a.txt"
    # stops before the viewer opens (the display is only there to get past the display check)
    message = run_with_display(monkeypatch, display, simulated_run, "imported.expt", f"model={bad}", f"output={output}")
    assert str(bad) in message and "dials.cnn_train" in message
    assert not output.exists()


def test_without_a_display_says_what_to_do(cbf_run, tmp_path, monkeypatch):
    message = run_without_display(monkeypatch, cbf_run, "imported.expt", f"output={tmp_path / 'a.txt'}")
    assert "xvfb-run" in message


def test_uncertain_order_needs_a_model(cbf_run, tmp_path, monkeypatch):
    message = run_without_display(monkeypatch, cbf_run, "imported.expt", "order=uncertain", f"output={tmp_path / 'a.txt'}")
    assert "order=uncertain needs model=" in message


if __name__ == "__main__":
    _drive(json.loads(sys.argv[1]), [tuple(a) for a in json.loads(sys.argv[2])], sys.argv[3])
