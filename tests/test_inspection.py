"""What a run writes for TensorBoard, read back with TensorBoard's own reader, its server and a real browser."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from cifarlab import board, build, inspection, projector

from cifarlab.data import batches, cifar10, datamodule
from cifarlab.module import CifarModule
from conftest import REPO, compose_config, get, option_names, read_metrics, run_cli

PAD = inspection.GRID_PADDING
STAGE_TAGS = [f"pool/stage{i}" for i in (1, 2, 3)]
INPUT_TAGS = ["pool/input", "pool/input/configured", "pool/input/max_vs_avg", "pool/input/unpool"]
FIGURE_TAGS = ["test/confusion_matrix", "test/per_class_acc", "test/misclassified"]
ARTIFACTS = REPO / "test-artifacts"


def accumulators(run_dir: Path) -> list[EventAccumulator]:
    accs = []
    for path in sorted(glob.glob(str(run_dir / "events.out.tfevents.*"))):
        acc = EventAccumulator(path, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
        acc.Reload()
        accs.append(acc)
    return accs


def images(run_dir: Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    """tag -> [(step, H x W x 3 uint8 pixels)], decoded from the PNGs TensorBoard stores."""
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for acc in accumulators(run_dir):
        for tag in acc.Tags()["images"]:
            out.setdefault(tag, []).extend(
                (e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
                for e in acc.Images(tag)
            )
    return out


def tiles(grid: np.ndarray, rows: int, cols: int, pad: int = PAD) -> np.ndarray:
    """Cut a make_grid image (padding `pad`) back into its tiles: (rows, cols, h, w, 3)."""
    h, w = (grid.shape[0] - pad) // rows - pad, (grid.shape[1] - pad) // cols - pad
    assert grid.shape[:2] == (rows * (h + pad) + pad, cols * (w + pad) + pad), grid.shape
    return np.stack([
        np.stack([grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w]
                  for c in range(cols)])
        for r in range(rows)
    ])


def stage_cells(grid: np.ndarray, views: int) -> np.ndarray:
    """Cut a stage image (inspection.stage_grid) into its maps: (images, channels, views, h, w) grey pixels."""
    cb = compose_config().callbacks.pooling_images
    cells = tiles(grid, cb.maps_images, cb.channels, pad=inspection.CELL_PADDING)[..., 0]  # grey: R = G = B
    width = (cells.shape[-1] - (views - 1) * PAD) // views
    assert cells.shape[-1] == views * width + (views - 1) * PAD
    return np.stack([cells[..., v * (width + PAD): v * (width + PAD) + width] for v in range(views)], axis=2)


@pytest.fixture(scope="module")
def run(subset_run):
    run_dir, _, args = subset_run
    cfg = compose_config(*args[:-1])
    return run_dir, cfg, images(run_dir)


def test_every_pooling_and_figure_tag_is_written(run):
    _, _, logged = run
    assert set(INPUT_TAGS + STAGE_TAGS + FIGURE_TAGS) <= logged.keys(), set(INPUT_TAGS + STAGE_TAGS) - logged.keys()
    epochs = read_metrics(run[0])["epochs"]
    for tag in STAGE_TAGS:  # at the start, then every epoch (every_n_epochs: 1)
        assert len(logged[tag]) == 1 + epochs, tag
    assert all(len(logged[t]) == 1 for t in INPUT_TAGS)


def test_stage_maps_are_grey_and_the_input_views_in_colour(run):
    _, _, logged = run
    for tag in STAGE_TAGS:
        pixels = logged[tag][-1][1]
        assert (pixels == pixels[..., :1]).all(), tag  # R = G = B
    for tag in INPUT_TAGS:
        pixels = logged[tag][-1][1]
        assert not (pixels == pixels[..., :1]).all(), tag


@pytest.mark.parametrize("channels", [1, 3])
def test_add_image_stores_exactly_the_given_pixels(tmp_path, channels):
    image = torch.randint(0, 256, (channels, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    writer = SummaryWriter(str(tmp_path))
    inspection.add_image(writer, "probe", image, 7)
    writer.close()
    (acc,) = accumulators(tmp_path)
    (event,) = acc.Images("probe")
    assert (event.step, event.height, event.width) == (7, 37, 53)
    pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert np.array_equal(pixels, image.expand(3, -1, -1).permute(1, 2, 0).numpy())


def test_labelled_grid_puts_each_label_over_its_own_image():
    colours = [np.full((32, 32, 3), c / 10) for c in range(10)]
    colours[9][:8] = 0  # a black band at the top of the last image: shown the right way up
    fig = inspection.labelled_grid(colours, [f"class {c}\n→ other" for c in range(10)], cols=4)
    (ax,) = fig.axes
    assert len(ax.images) == 10 and [t.get_text().split("\n")[0] for t in ax.texts] == [f"class {c}" for c in range(10)]
    for image, text in zip(ax.images, ax.texts):
        left, right, bottom, top = image.get_extent()  # y grows downwards: top < bottom
        x, y = text.get_position()
        assert left < x < right and top - 0.3 < y < top  # centred over its image, just above it
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    for c, image in enumerate(ax.images):  # each image's own grey at the centre of where it says it is
        left, right, bottom, top = image.get_extent()
        x, y = ax.transData.transform(((left + right) / 2, (top + bottom) / 2))
        assert np.abs(pixels[pixels.shape[0] - int(y), int(x)] - 25.5 * c).max() <= 1, c
    left, right, bottom, top = ax.images[9].get_extent()
    x, y = ax.transData.transform(((left + right) / 2, top + 0.1 * (bottom - top)))  # a tenth of the way down
    assert pixels[pixels.shape[0] - int(y), int(x)].max() == 0


def test_input_views_show_the_same_seeded_validation_images(run, subset_root):
    run_dir, cfg, logged = run
    cb = cfg.callbacks.pooling_images
    arrays = cifar10.load_cifar10(subset_root, download=False)
    dm = datamodule.CifarDataModule(arrays, batches.val_count(cfg.data.val_size, len(arrays.train_y)),
                                    cfg.data.split_seed, 256, 1000, True, False, 0, 0)
    expected = dm.val_x[inspection.pick_images(dm.val_y, cb.per_class, cb.seed)]  # (20, 3, 32, 32) uint8
    assert sorted(dm.val_y[inspection.pick_images(dm.val_y, cb.per_class, cb.seed)].tolist()) == sorted(
        list(range(10)) * cb.per_class)
    grid = logged["pool/input"][0][1]
    shown = tiles(grid, cb.per_class, 10).reshape(-1, 32, 32, 3)
    assert np.array_equal(shown, expected.permute(0, 2, 3, 1).numpy())


def test_max_vs_avg_rows_are_max_and_average_pooling_of_the_images(run):
    _, cfg, logged = run
    per_class = cfg.callbacks.pooling_images.per_class
    t = tiles(logged["pool/input/max_vs_avg"][0][1], 3 * per_class, 10).astype(np.float32)
    original, maxed, avged = t[0::3], t[1::3], t[2::3]  # (per_class, 10, 32, 32, 3) each
    x = torch.from_numpy(original).reshape(-1, 32, 32, 3).permute(0, 3, 1, 2)
    got_max = torch.from_numpy(maxed).reshape(-1, 32, 32, 3).permute(0, 3, 1, 2)[..., ::2, ::2]  # undo the 2x zoom
    got_avg = torch.from_numpy(avged).reshape(-1, 32, 32, 3).permute(0, 3, 1, 2)[..., ::2, ::2]
    assert torch.equal(got_max, F.max_pool2d(x, 2))
    assert (got_avg - F.avg_pool2d(x, 2)).abs().max() <= 1  # one grey level of rounding
    assert not torch.equal(got_max, got_avg)


def test_each_stage_shows_before_after_and_unpool_side_by_side_after_being_the_pooling_of_before(run):
    """For every stage and every logged step, each channel's cell holds before | after | unpool, each zoomed to 32 px:
    max-pool the 'before' map and get the 'after' map, pixel for pixel; unpool keeps each window's maximum alone."""
    _, _, logged = run
    model = build.network(compose_config().model)
    before_sizes = [32] + [h for h, _ in model.feature_sizes[:-1]]  # the convs keep the size; pooling halves it
    for i, (size_in, (size_out, _)) in enumerate(zip(before_sizes, model.feature_sizes), start=1):
        for step, grid in logged[f"pool/stage{i}"]:
            maps = stage_cells(grid, views=3)  # (K, C, 3, 32, 32)
            zb, za = 32 // size_in, 32 // size_out
            assert maps.shape[-1] == 32  # small maps are zoomed to the same tile size
            b_map = torch.from_numpy(maps[:, :, 0, ::zb, ::zb].astype(np.float32))  # (K, C, size_in, size_in)
            a_map = torch.from_numpy(maps[:, :, 1, ::za, ::za].astype(np.float32))
            u_map = torch.from_numpy(maps[:, :, 2, ::zb, ::zb].astype(np.int32))
            assert torch.equal(F.max_pool2d(b_map, 2), a_map), (i, step)
            assert b_map.std() > 10  # real feature maps, not a blank tile
            windows_u = u_map.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)  # (..., 4)
            windows_b = b_map.int().unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)
            assert ((windows_u != 0).sum(-1) <= 1).all(), i  # at most the one kept value per window
            kept = windows_u.max(-1).values
            assert torch.equal(kept[kept > 0], windows_b.max(-1).values[kept > 0])  # and it is the window's maximum
            assert (u_map == 0).float().mean() >= 0.75  # three of every four values dropped


def test_input_unpool_rows_drop_three_of_every_four_values(run):
    _, cfg, logged = run
    full = tiles(logged["pool/input/unpool"][0][1], 2 * cfg.callbacks.pooling_images.per_class, 10)
    assert (full[1::2] == 0).mean() >= 0.75  # each colour channel pools alone


def test_graph_has_every_layer_of_the_model(run):
    run_dir = run[0]
    graphs = [acc.Graph() for acc in accumulators(run_dir) if acc.Tags()["graph"]]
    assert len(graphs) == 1
    names = {n.name for n in graphs[0].node}
    for scope in ("Stage[stage1]/Conv2d[conv]", "Stage[stage1]/MaxPool2d[pool]", "Stage[stage3]/MaxPool2d[pool]",
                  "Linear[fc1]", "Linear[fc2]"):
        assert any(scope in n for n in names), scope


GRAPH_CASES = [(g, o) for g in build.LAYER_GROUPS for o in option_names(f"model/{g}")]


@pytest.mark.parametrize("group,option", GRAPH_CASES, ids=[f"{g}={o}" for g, o in GRAPH_CASES])
def test_graph_traces_for_every_option_in_eval_mode(tmp_path, group, option):
    model = build.network(compose_config(f"model/{group}={option}").model).train()
    writer = SummaryWriter(str(tmp_path))
    inspection.log_graph(writer, model, torch.zeros(2, 3, 32, 32))
    writer.close()
    assert model.training  # put back as it was
    acc = EventAccumulator(glob.glob(str(tmp_path / "events.*"))[0])
    acc.Reload()
    nodes = {n.name: n for n in acc.Graph().node}
    for name, module in model.named_modules():
        if name and not list(module.children()):  # every leaf layer shows up under its scope
            scope = f"{type(module).__name__}[{name.rsplit('.', 1)[-1]}]"
            assert any(scope in n for n in nodes), (name, scope)
    # Random layers were traced with training=False: dropout(x, p, train) and rrelu(x, lower, upper, training).
    flag_input = {"aten::dropout": 2, "aten::feature_dropout": 2, "aten::rrelu": 3}
    random_nodes = [n for n in nodes.values() if n.op in flag_input]
    assert len(random_nodes) == {"dropout": 4, "dropout2d": 4, "rrelu": 4}.get(option, 0)  # 3 stages + the head
    for node in random_nodes:
        flag = nodes[node.input[flag_input[node.op]]]
        assert flag.op == "prim::Constant" and flag.attr["attr"].s.decode() == "{ value : 0}", node.name


def test_histograms_and_per_class_scalars(run):
    run_dir = run[0]
    tags = {"histograms": set(), "scalars": set()}
    for acc in accumulators(run_dir):
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    assert {"weights/stage1.conv.weight", "weights/stage3.conv.weight", "weights/fc1.weight"} <= tags["histograms"]
    assert {f"test/acc_class/{c}" for c in ("airplane", "cat", "truck")} <= tags["scalars"]
    assert {"time/epoch_s", "time/train_img_per_s"} <= tags["scalars"]


def test_figures_are_real_images(run):
    _, _, logged = run
    for tag in FIGURE_TAGS:
        pixels = logged[tag][-1][1]
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600, tag
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, tag  # drawn, not blank


def hparams_written(run_dir: Path) -> tuple[dict, list[str]]:
    """The session_start_info hparams and the experiment's metric tags, parsed from the event files."""
    hparams, metrics = {}, []
    for path in glob.glob(str(run_dir / "events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                content = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                if content.HasField("session_start_info"):
                    for k, v in content.session_start_info.hparams.items():
                        hparams[k] = v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                if content.HasField("experiment"):
                    metrics += [m.name.tag for m in content.experiment.metric_infos]
    return hparams, metrics


def test_hparams_hold_the_choices_and_real_metrics(run):
    run_dir, cfg, _ = run
    hparams, metric_tags = hparams_written(run_dir)
    assert (hparams["Pool"], hparams["Activation"], hparams["Norm"], hparams["Dropout"]) == ("max", "none", "none", "none")
    assert hparams["model/pool.kernel_size"] == 2 and hparams["lr"] == pytest.approx(cfg.optimizer.lr)
    assert {"optimizer", "batch_size", "epochs", "seed", "data_source", "version/torch", "version/git_commit"
            } <= hparams.keys()
    assert metric_tags == ["hparams/test_acc", "hparams/best_val_acc", "hparams/params", "hparams/epoch_s"]
    scalars = {}
    for acc in accumulators(run_dir):
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = acc.Scalars(tag)[-1].value
    metrics = read_metrics(run_dir)
    assert scalars["hparams/test_acc"] == pytest.approx(metrics["test_acc"])
    assert scalars["hparams/params"] == metrics["params"]
    assert "hp_metric" not in scalars  # no placeholder


def test_plain_callbacks_write_no_inspection(tmp_path):
    run_dir = tmp_path / "plain"
    result = run_cli("data=synthetic", "data.n_train=600", "trainer.max_epochs=1", "callbacks=plain",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not images(run_dir)
    assert all(not acc.Tags()["graph"] and not acc.Tags()["histograms"] and
               not [t for t in acc.Tags()["tensors"] if t.startswith("test/pr_curve/")] for acc in accumulators(run_dir))
    assert not (run_dir / "projector_config.pbtxt").exists()


def synthetic_pooling_run(tmp_path: Path, pool: str) -> dict[str, list[tuple[int, np.ndarray]]]:
    """One epoch on made-up images with model/pool=<pool>; its logged images."""
    run_dir = tmp_path / pool
    result = run_cli("data=synthetic", "data.n_train=600", "trainer.max_epochs=1", f"model/pool={pool}",
                     "model/activation=relu", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return images(run_dir)


def unzoomed(maps: np.ndarray, size: int) -> torch.Tensor:
    return torch.from_numpy(maps[..., :: 32 // size, :: 32 // size].astype(np.float32))


def test_avg_pooling_run_shows_before_and_after_without_unpool(tmp_path):
    logged = synthetic_pooling_run(tmp_path, "avg")
    maps = stage_cells(logged["pool/stage2"][-1][1], views=2)  # before | after: no unpool for average pooling
    recomputed = F.avg_pool2d(unzoomed(maps[:, :, 0], 16), 2)
    assert (recomputed - unzoomed(maps[:, :, 1], 8)).abs().max() <= 1  # rounding of the shown pixels


def test_blurmax_run_shows_the_dense_max_map_between_before_and_its_blurred_samples(tmp_path):
    """model/pool=blurmax: each cell is before | dense max | after. The dense map is the stride-1 max of the shown
    'before' map (exactly: max commutes with the display scaling and rounding), and 'after' is its [1 2 1]^2 / 16
    blur sampled every 2 px."""
    logged = synthetic_pooling_run(tmp_path, "blurmax")
    blur = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]])[None, None] / 16
    for i, size in zip((1, 2, 3), (32, 16, 8)):
        maps = stage_cells(logged[f"pool/stage{i}"][-1][1], views=3)
        before, dense = unzoomed(maps[:, :, 0], size), unzoomed(maps[:, :, 1], size)  # (K, C, size, size)
        after = unzoomed(maps[:, :, 2], size // 2).flatten(0, 1)[:, None]  # (K * C, 1, h, w)
        assert torch.equal(F.max_pool2d(before, 3, 1, 1), dense), i
        blurred = F.conv2d(F.pad(dense.flatten(0, 1)[:, None], (1, 1, 1, 1), mode="reflect"), blur, stride=2)
        assert (blurred - after).abs().max() <= 1, i  # rounding of the shown pixels
        assert (F.max_pool2d(before, 3, 2, 1).flatten(0, 1)[:, None] - after).abs().max() > 8, i  # not plain max
    assert logged["pool/input/configured"]  # the configured pooling of the RGB images: 3 channels, not 32


# ---------------------------------------------------------------------------------------------------------------
# A real TensorBoard server and a real browser


@pytest.fixture(scope="module")
def server(run):
    """scripts/tensorboard.sh (the command a user types) on the run folder; yields its base URL, stops it after."""
    proc = subprocess.Popen([str(REPO / "scripts" / "tensorboard.sh"), str(run[0])], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert f"TensorBoard for {run[0]} at http://127.0.0.1:" in first, first
        url = first.split(" at ")[1].split()[0].rstrip("/")
        board.wait_until_up(url, proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_server_lists_images_scalars_graph_histograms_and_hparams(server, run):
    plugins = get(f"{server}/data/plugins_listing")
    for name in ("images", "scalars", "graphs", "histograms", "hparams"):
        assert plugins[name]["enabled"], name
    image_tags = get(f"{server}/data/plugin/images/tags")["."]
    assert set(INPUT_TAGS + STAGE_TAGS + FIGURE_TAGS) <= image_tags.keys()
    assert {"train/loss", "val/acc", "test/acc", "train/lr"} <= get(f"{server}/data/plugin/scalars/tags")["."].keys()
    assert get(f"{server}/data/plugin/graphs/info")["."]["run_graph"]
    assert "weights/fc1.weight" in get(f"{server}/data/plugin/histograms/tags")["."]
    groups = get(f"{server}/data/plugin/hparams/session_groups",
                 {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"], "colParams": [],
                  "startIndex": 0, "sliceSize": 10})["sessionGroups"]
    assert len(groups) == 1 and groups[0]["hparams"]["Pool"] == "max"
    values = {m["name"]["tag"]: m["value"] for m in groups[0]["metricValues"]}
    assert values["hparams/test_acc"] == pytest.approx(read_metrics(run[0])["test_acc"])


def test_the_hparams_dashboard_shows_the_four_layer_choices_and_the_test_accuracy_first(server):
    experiment = get(f"{server}/data/plugin/hparams/experiment", {"experimentName": ""})
    columns = [h["name"] for h in experiment["hparamInfos"]]
    assert set(columns[:4]) == {"Pool", "Activation", "Norm", "Dropout"}, columns
    assert [m["name"]["tag"] for m in experiment["metricInfos"]][0] == "hparams/test_acc"


def photo_colours(pixels: np.ndarray) -> int:
    """Distinct colours (5 bits per channel) below the header: hundreds for photos, a few dozen for bare UI."""
    body = pixels[80:] // 8
    return len(np.unique(body.reshape(-1, 3), axis=0))


@pytest.mark.skipif(board.chromium() is None, reason="chromium not installed (.ci/run installs Debian's chromium)")
def test_browser_shows_the_pooling_images(server, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = np.asarray(Image.open(board.screenshot(f"{server}/#images", ARTIFACTS / "tensorboard_images.png")))
    assert shot.shape[:2] == (1000, 1400)
    # Control: the same dashboard with no data renders as bare UI.
    empty = tmp_path / "empty"
    empty.mkdir()
    with board.serve(empty) as url:
        bare = np.asarray(Image.open(board.screenshot(f"{url}/#images", tmp_path / "empty.png")))
    assert photo_colours(bare) < 200, photo_colours(bare)
    assert photo_colours(shot) > 3 * max(photo_colours(bare), 100), (photo_colours(shot), photo_colours(bare))


def wait_for_plugins(url: str, *names: str, timeout: float = 60) -> dict:
    """The projector decides it is active in a thread of its own, after the first listing asks: ask until it says."""
    deadline = time.monotonic() + timeout
    while True:
        plugins = get(f"{url}/data/plugins_listing")
        if all(plugins[n]["enabled"] for n in names) or time.monotonic() > deadline:
            return plugins
        time.sleep(0.5)


def fetch(url: str, path: str, **query: str) -> bytes:
    return urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=60).read()


class Outputs(L.Callback):
    def on_test_start(self, trainer, pl_module):
        self.logits = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.logits.append(outputs.float())


@pytest.fixture(scope="module")
def tested(run, subset_root):
    """The run's tested checkpoint scored again here, through Lightning's test loop in the run's precision and with
    its batches: the test set's softmax probabilities; and the projector's images (the seeded choice) with their
    features, in fp32 as the projector computes them."""
    run_dir, cfg, _ = run
    arrays = cifar10.load_cifar10(subset_root, download=False)
    dm = datamodule.CifarDataModule(arrays, batches.val_count(cfg.data.val_size, len(arrays.train_y)),
                                    cfg.data.split_seed, cfg.data.batch_size, cfg.data.eval_batch_size,
                                    cfg.data.normalize, False, 0, cfg.seed)
    module = CifarModule.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", model=build.network(cfg.model),
                                              optimizer=None)
    outputs = Outputs()
    L.Trainer(accelerator="cpu", devices=1, precision=read_metrics(run_dir)["precision"], logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[outputs]).test(module, datamodule=dm, verbose=False)
    n = min(cfg.callbacks.projector.images, len(dm.test_y))
    index = torch.randperm(len(dm.test_y), generator=torch.Generator().manual_seed(cfg.callbacks.projector.seed))[:n]
    index = index.sort().values
    with torch.no_grad():
        features = module.model.eval().features(dm.normalizer(dm.test_x[index]).float())
    return {"labels": dm.test_y, "probs": torch.cat(outputs.logits).softmax(1), "index": index,
            "images": dm.test_x[index], "features": features, "classes": dm.classes,
            "step": read_metrics(run_dir)["steps"]}


def test_server_shows_the_projector_before_and_after_with_thumbnails_and_the_test_labels(server, tested):
    assert wait_for_plugins(server, "projector")["projector"]["enabled"]
    assert json.loads(fetch(server, "/data/plugin/projector/runs")) == ["."]
    config = json.loads(fetch(server, "/data/plugin/projector/info", run="."))
    n, step = len(tested["index"]), tested["step"]
    shapes = {e["tensorName"]: e["tensorShape"] for e in config["embeddings"]}
    assert n == 1000 and shapes == {
        f"{name} @ step {s} ({when})": [n, width] for name, width in (("flatten", 1024), ("hidden", 64))
        for s, when in ((0, "before training"), (step, "tested"))}
    # the sprite: each image of the choice as its thumbnail, in order, 32 to a row
    sprite = np.asarray(Image.open(io.BytesIO(fetch(server, "/data/plugin/projector/sprite_image", run=".",
                                                    name=f"hidden @ step {step} (tested)"))).convert("RGB"))
    side = math.ceil(math.sqrt(n))
    assert sprite.shape == (side * 32, side * 32, 3)
    thumbs = sprite.reshape(side, 32, side, 32, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 32, 32, 3)[:n]
    assert np.array_equal(thumbs, tested["images"].permute(0, 2, 3, 1).numpy())
    classes, labels = tested["classes"], tested["labels"]
    predicted = tested["features"]["logits"].argmax(1)
    for when, s in (("before training", 0), ("tested", step)):
        text = fetch(server, "/data/plugin/projector/metadata", run=".", name=f"hidden @ step {s} ({when})").decode()
        header, *rows = [line.split("\t") for line in text.strip().split("\n")]
        assert header == ["image", "true", "predicted", "correct"] and len(rows) == n
        assert [int(r[0]) for r in rows] == tested["index"].tolist()
        assert [r[1] for r in rows] == [classes[int(y)] for y in labels[tested["index"]]]
        assert all(r[3] == str(r[1] == r[2]) for r in rows)
    # after testing: the tested checkpoint's predictions and features, to the 5 digits written
    assert [r[2] for r in rows] == [classes[int(p)] for p in predicted]
    for name in ("hidden", "flatten"):
        served = np.frombuffer(fetch(server, "/data/plugin/projector/tensor", run=".",
                                     name=f"{name} @ step {step} (tested)"), dtype=np.float32).reshape(n, -1)
        expected = tested["features"][name].numpy()
        np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_pr_curves_per_class_agree_with_the_tested_checkpoint_and_its_per_class_accuracy(server, run, tested):
    assert wait_for_plugins(server, "pr_curves")["pr_curves"]["enabled"]
    classes, labels, probs = tested["classes"], tested["labels"], tested["probs"]
    tags = get(f"{server}/data/plugin/pr_curves/tags")["."]
    assert set(tags) == {f"test/pr_curve/{c}" for c in classes}
    per_class_acc = {}
    for acc in accumulators(run[0]):
        for c in classes:
            if f"test/acc_class/{c}" in acc.Tags()["scalars"]:
                per_class_acc[c] = acc.Scalars(f"test/acc_class/{c}")[-1].value
    for k, c in enumerate(classes):
        (curve,) = json.loads(fetch(server, "/data/plugin/pr_curves/pr_curves", run=".", tag=f"test/pr_curve/{c}"))["."]
        assert curve["step"] == tested["step"]
        half = curve["thresholds"].index(0.5)
        tp, fp, fn = (curve[key][half] for key in ("true_positives", "false_positives", "false_negatives"))
        positive, mine = labels == k, probs[:, k] >= 0.5
        assert (tp, fp) == (int((mine & positive).sum()), int((mine & ~positive).sum()))
        assert curve["true_positives"][0] + curve["false_negatives"][0] == int(positive.sum())  # all of class k
        # p >= 0.5 makes class k the arg max: the images found at 0.5 are among those the confusion matrix counts
        # right, so recall at 0.5 is at most the class's test accuracy, and precision at 0.5 is what they imply
        assert tp + fn == int(positive.sum()) and tp / (tp + fn) <= per_class_acc[c] + 1e-6
        assert curve["precision"][half] == pytest.approx(tp / max(tp + fp, 1), abs=1e-6)
        assert curve["recall"][half] == pytest.approx(tp / (tp + fn), abs=1e-6)


def test_the_projector_config_keeps_every_step_a_resumed_run_wrote(tmp_path):
    """A resumed run is a new process: what its first start wrote stays listed, and a step written again replaces
    its own entry."""
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    rows = [[str(i), "cat", "dog", "False"] for i in range(5)]
    projector.write_projector(tmp_path, 0, "before training", {"hidden": torch.randn(5, 64)}, rows, images)
    projector.write_projector(tmp_path, 40, "tested", {"hidden": torch.randn(5, 64)}, rows, images)
    again = torch.randn(5, 64)
    projector.write_projector(tmp_path, 40, "tested", {"hidden": again}, rows, images)
    text = (tmp_path / "projector_config.pbtxt").read_text()
    assert not list(tmp_path.glob("*.partial*"))  # written aside, then moved over the old one
    assert text.count("tensor_name:") == 2
    assert 'tensor_name: "hidden @ step 0 (before training)"' in text and "hidden @ step 40 (tested)" in text
    written = np.loadtxt(tmp_path / "projector" / "step-000040-tested" / "hidden.tsv", delimiter="\t")
    np.testing.assert_allclose(written, again.numpy(), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tensorflow_python():
    """A Python that sees this environment's packages with tensorflow-cpu added (its own dependencies where this
    environment has none), as `pip install tensorflow` leaves a user's; removed afterwards (1.5 GB)."""
    import site
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cifarlab-tf-") as env:
        subprocess.run([sys.executable, "-m", "venv", env], check=True, timeout=300)
        python = Path(env) / "bin" / "python"
        inner = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True).stdout.strip()
        (Path(inner) / "zz_cifarlab.pth").write_text(f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n")
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "tensorflow-cpu"], capture_output=True,
                             text=True, timeout=900)
        if pip.returncode != 0:
            pytest.skip(f"tensorflow-cpu could not be installed: {pip.stderr.strip().splitlines()[-1:]}")
        yield python


@pytest.mark.slow  # installs tensorflow-cpu (about 15 s from a local index) and trains through the command line
def test_with_tensorflow_installed_the_projector_and_pr_curves_are_written_and_served(tensorflow_python, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    probe = subprocess.run([str(tensorflow_python), "-c", "from tensorboard.compat import tf; print(tf.__version__)"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip()[:1].isdigit(), probe.stderr  # the real TensorFlow, not stub
    run_dir = tmp_path / "run"
    train = subprocess.run([str(tensorflow_python), "-c", "from cifarlab.cli import cli; cli()", "data=synthetic",
                            "data.n_train=600", "data.n_test=1200", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    port = board.free_port()
    server = subprocess.Popen([str(tensorflow_python), "-m", "tensorboard.main", "--logdir", str(run_dir), "--host",
                               board.HOST, "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://{board.HOST}:{port}"
    try:
        board.wait_until_up(url, server)
        plugins = wait_for_plugins(url, "projector", "pr_curves")
        assert plugins["projector"]["enabled"] and plugins["pr_curves"]["enabled"]
        config = json.loads(fetch(url, "/data/plugin/projector/info", run="."))
        step = read_metrics(run_dir)["steps"]
        assert [(e["tensorName"], e["tensorShape"]) for e in config["embeddings"]][:2] == [
            (f"flatten @ step {step} (tested)", [1000, 1024]), (f"hidden @ step {step} (tested)", [1000, 64])]
        served = fetch(url, "/data/plugin/projector/tensor", run=".", name=f"hidden @ step {step} (tested)")
        assert len(served) == 1000 * 64 * 4  # float32
        assert len(get(f"{url}/data/plugin/pr_curves/tags")["."]) == 10
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_tensorboard_refuses_a_missing_folder(tmp_path):
    result = subprocess.run([str(REPO / "scripts" / "tensorboard.sh"), str(tmp_path / "nope")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "does not exist" in result.stderr
