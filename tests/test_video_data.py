"""Video data: Moving Fashion-MNIST (deterministic, and frame order decides within every pair of classes) and
folders of real video files decoded with TorchCodec."""
import pytest
import torch

from tokenthrift.data import MovingFashionMNIST, build_dataset, uniform_indices


def test_moving_fashion_mnist_is_deterministic_and_shaped_as_clips():
    a = MovingFashionMNIST(train=False, frames=6, size=32, num_clips=40, seed=3)
    b = MovingFashionMNIST(train=False, frames=6, size=32, num_clips=40, seed=3)
    clip, label = a[7]
    assert clip.shape == (1, 6, 32, 32) and 0 <= label < 6 and torch.equal(clip, b[7][0])
    assert not torch.equal(clip, MovingFashionMNIST(train=False, frames=6, size=32, num_clips=40, seed=4)[7][0])
    assert not torch.equal(clip[:, 0], clip[:, -1])  # it moves
    assert sorted(set(a.targets)) == list(range(6)) and a.targets[7] == label


def test_frame_order_decides_within_every_pair():
    """The second class of a pair is the first played backwards: both have the same frames, so their mean
    frame (what a frame-averaging model sees) is identical and such a model is at chance within the pair."""
    ds = MovingFashionMNIST(train=True, frames=8, size=28, num_clips=30)
    for i in range(30):
        for pair in range(3):
            forward, _ = ds.clip(i, label=2 * pair)
            backward, _ = ds.clip(i, label=2 * pair + 1)
            assert torch.equal(backward, forward.flip(1))
            torch.testing.assert_close(backward.mean(1), forward.mean(1))
            assert not torch.equal(backward, forward)


def test_build_dataset_gives_normalised_clips_of_the_models_shape():
    ds, info = build_dataset("moving-fashion-mnist", True, 28, 3, subset=20, frames=4)
    clip, _ = ds[0]
    assert clip.shape == (3, 4, 28, 28) and info.num_classes == 6 and len(ds) == 20
    raw, _ = MovingFashionMNIST(train=True, frames=4, size=28)[ds.indices[0]]
    torch.testing.assert_close(clip[1], (raw[0] - 0.0953) / 0.2288)  # the grey channel repeated, normalised
    with pytest.raises(ValueError, match="needs the model's frame count"):
        build_dataset("moving-fashion-mnist", True, 28, 1)
    with pytest.raises(ValueError, match="holds images"):
        build_dataset("fashion-mnist", True, 28, 1, frames=8)


def write_videos(root, frames=12, size=40):
    from torchcodec.encoders import VideoEncoder

    videos = {}
    for split in ("train", "val"):
        for c, name in enumerate(["left", "right"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(2):
                ramp = torch.linspace(0, 255, frames).round().to(torch.uint8)  # brightness tells the frame index
                video = ramp.view(frames, 1, 1, 1).expand(frames, 3, size, size).contiguous()
                if c:
                    video = video.flip(0)
                path = folder / f"{k}.mp4"
                VideoEncoder(video, frame_rate=10).to_file(str(path))
                videos[path] = video
    return videos


def test_videofolder_reads_real_files_through_torchcodec(tmp_path):
    write_videos(tmp_path)
    ds, info = build_dataset(f"videofolder:{tmp_path}", False, 32, 3, frames=4)
    assert info.num_classes == 2 and len(ds) == 4
    clip, label = ds[0]
    assert clip.shape == (3, 4, 32, 32) and label == 0
    # the frames sampled uniformly: the middle of 4 equal segments of 12 frames (1, 4, 7, 10), in order
    assert uniform_indices(12, 4) == [1, 4, 7, 10]
    level = ds.read(0)[:, 0].float().mean((1, 2))
    expected = torch.linspace(0, 255, 12)[[1, 4, 7, 10]]
    assert torch.allclose(level, expected, atol=6)  # lossy codec: close, not equal
    train, _ = build_dataset(f"videofolder:{tmp_path}", True, 32, 3, frames=4)
    assert train[1][0].shape == (3, 4, 32, 32)


def test_unreadable_video_names_the_file(tmp_path):
    folder = tmp_path / "val" / "a"
    folder.mkdir(parents=True)
    (folder / "broken.mp4").write_bytes(b"not a video")
    ds, _ = build_dataset(f"videofolder:{tmp_path}", False, 32, 3, frames=4)
    with pytest.raises(ValueError, match="cannot decode video .*broken.mp4"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="no video files"):
        (tmp_path / "val" / "b").mkdir()
        (folder / "broken.mp4").unlink()
        build_dataset(f"videofolder:{tmp_path}", False, 32, 3, frames=4)


@pytest.mark.slow  # make test-slow (CI): minutes on two cores
def test_the_revit_pipeline_runs_unchanged_on_video(tmp_path, capsys):
    """train --method revit, assign-labels, train --method tla, eval --adaptive: the image commands, with a
    TimeSformer on Moving Fashion-MNIST."""
    from test_cli import parse_table

    from tokenthrift.apps.cli import main

    video = ["--model", "timesformer_tiny_patch16_224", "--img-size", "28", "--patch-size", "2", "--num-frames", "4",
             "--depth", "2", "--embed-dim", "24", "--num-heads", "2", "--in-chans", "1", "--data",
             "moving-fashion-mnist", "--train-subset", "128", "--eval-subset", "64", "--epochs", "1",
             "--warmup-epochs", "0", "--batch-size", "32", "--no-progress", "--output", str(tmp_path)]
    main(["train", *video, "--method", "revit", "--name", "revit"])
    for split in ("train", "eval"):
        main(["assign-labels", "--checkpoint", str(tmp_path / "revit" / "last.pth"), "--split", split,
              "--out", str(tmp_path / f"{split}.pt")])
    main(["train", *video, "--method", "tla", "--tla-labels", str(tmp_path / "train.pt"), "--tla-eval-labels",
          str(tmp_path / "eval.pt"), "--tla-model", "test_byobnet", "--name", "tla"])
    capsys.readouterr()
    main(["adaptive", "--checkpoint", str(tmp_path / "revit" / "last.pth"), "--assigner",
          str(tmp_path / "tla" / "last.pth"), "--throughput-batch", "16", "--calibration-images", "64",
          "--plot", str(tmp_path / "adaptive.png")])
    rows = {r["rule"]: r for r in parse_table(capsys.readouterr().out)}
    assert {"always 14x14", "always 10x10", "always 7x7", "argmax"} <= set(rows)
    # the cascade over the TimeSformer's grids, one decision per clip, calibrated on clips the run never saw
    cascade = rows["cascade max_prob, budget 0.6"]
    assert rows["always 7x7"]["MACs_ratio"] <= cascade["MACs_ratio"] and cascade["img_s"] > 0
    assert rows["always 7x7"]["MACs_ratio"] < 0.2 and rows["argmax"]["img_s"] > 0
    with pytest.raises(SystemExit):  # the assigner picks a grid from one view of each clip: adaptive has no crops
        main(["adaptive", "--checkpoint", str(tmp_path / "revit" / "last.pth"), "--assigner",
              str(tmp_path / "tla" / "last.pth"), "--test-crops", "3"])
    assert "unrecognized arguments: --test-crops 3" in capsys.readouterr().err


def test_three_crop_testing_averages_the_views_of_each_clip(tmp_path):
    """--test-crops 3: the shorter side at the model's size, three crops along the longer side (both ends and
    the centre) stacked as views; evaluate() scores the views' averaged probabilities."""
    from torchcodec.encoders import VideoEncoder

    from tokenthrift.data import dataset_info
    from tokenthrift.train import evaluate

    for split in ("train", "val"):
        folder = tmp_path / split / "a"
        folder.mkdir(parents=True)
        columns = torch.arange(48).mul(5).to(torch.uint8)  # brightness tells the column: the crops differ
        video = columns.view(1, 1, 1, 48).expand(6, 3, 32, 48).contiguous()
        VideoEncoder(video, frame_rate=10).to_file(str(folder / "wide.mp4"))
    ds, _ = build_dataset(f"videofolder:{tmp_path}", False, 32, 3, frames=3, test_crops=3)
    views, label = ds[0]
    assert views.shape == (3, 3, 3, 32, 32) and label == 0  # (views, C, T, H, W)
    info = dataset_info("videofolder:-")
    mean, std = torch.tensor(info.mean).view(3, 1, 1, 1), torch.tensor(info.std).view(3, 1, 1, 1)
    frames = (ds.read(0).float().div(255).transpose(0, 1) - mean) / std  # (C, T, 32, 48), as decoded
    for view, start in zip(views, (0, 8, 16)):
        assert torch.allclose(view, frames[..., start:start + 32], atol=1e-4)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 3 * 32 * 32, 4))
    clips = torch.randn(10, 3, 3, 3, 32, 32)
    with torch.no_grad():
        probs = model(clips.flatten(0, 1)).softmax(-1).view(10, 3, 4).mean(1)
    targets = probs.argmax(-1)
    targets[:3] = (targets[:3] + 1) % 4  # three wrong on purpose
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(clips, targets), 4)
    assert evaluate(model, loader, torch.device("cpu")) == pytest.approx(70.0)

    with pytest.raises(ValueError, match="applies to evaluating videofolder"):
        build_dataset(f"videofolder:{tmp_path}", True, 32, 3, frames=3, test_crops=3)
    with pytest.raises(ValueError, match="applies to evaluating videofolder"):
        build_dataset("moving-fashion-mnist", False, 28, 1, frames=4, test_crops=3)
    with pytest.raises(ValueError, match="1 \\(a centre crop\\) or 3"):
        build_dataset(f"videofolder:{tmp_path}", False, 32, 3, frames=3, test_crops=5)
