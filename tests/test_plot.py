"""hamjax.train.plot.plot_against_kv_fraction: HAM one line in order of KV fraction, baselines
labelled points whose labels stay apart; and no module of hamjax switches matplotlib's backend."""

from __future__ import annotations

import subprocess
import sys

from matplotlib.figure import Figure

from hamjax.train.plot import BASELINE_STYLES, plot_against_kv_fraction


def test_ham_is_one_line_by_kv_fraction_and_baselines_are_labelled_points():
    ax = Figure().subplots()
    ham = [(0.5, 2.0, 0.5), (0.05, 2.3, 0.05), (0.25, 2.1, 0.25)]
    plot_against_kv_fraction(ax, ham, [("GDN", 0.0, 2.2), ("Transformer", 1.0, 2.4)])
    line, gdn, transformer = ax.get_lines()
    assert list(line.get_xdata()) == [0.05, 0.25, 0.5] and list(line.get_ydata()) == [2.3, 2.1, 2.0]
    assert (gdn.get_label(), gdn.get_marker()) == ("GDN", BASELINE_STYLES["GDN"][0])
    assert (list(transformer.get_xdata()), list(transformer.get_ydata())) == ([1.0], [2.4])
    labels = [text.get_text() for text in ax.texts]
    assert labels == ["target 0.05", "target 0.25", "target 0.5", "GDN", "Transformer"]


def test_labels_of_neighbouring_points_are_offset_apart():
    ax = Figure().subplots()
    ham = [(0.05, 2.14, 0.05), (0.1, 2.15, 0.1)]
    plot_against_kv_fraction(ax, ham, [("GDN + attention", 0.25, 2.09), ("GDN + SWA", 0.25, 2.09)])
    offsets = {text.get_text(): text.xyann for text in ax.texts}
    assert offsets["target 0.1"][1] < 0 < offsets["target 0.05"][1]
    assert offsets["GDN + attention"] != offsets["GDN + SWA"]


def test_a_baseline_that_covers_a_ham_point_labels_itself_on_the_left():
    ax = Figure().subplots()
    plot_against_kv_fraction(ax, [(0.25, 0.85, 0.25), (0.501, 0.991, 0.5)],
                             [("GDN + attention", 0.5, 0.996), ("GDN + SWA", 0.25, 0.7), ("GDN", 0.0, 0.5)])
    texts = {text.get_text(): text for text in ax.texts}
    assert texts["GDN + attention"].xyann[0] < 0 and texts["GDN + attention"].get_ha() == "right"
    # at a HAM point's KV fraction but far from its value, or far from every HAM point: on the right
    assert all(texts[name].xyann[0] > 0 for name in ("target 0.5", "GDN + SWA", "GDN"))


def test_importing_hamjax_leaves_the_matplotlib_backend_alone():
    code = ("import matplotlib; matplotlib.use('svg'); import hamjax.train, hamjax.train.plot, hamjax.bench; "
            "print(matplotlib.get_backend())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "svg"
