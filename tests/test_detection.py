"""Detection: timm (and LTM) backbones in torchvision's Mask R-CNN, COCO-layout data read with pycocotools,
COCO metrics, the collage set, and the engine and command line with --task detection."""
import copy
import json

import numpy as np
import pytest
import torch

import tokenthrift  # noqa: F401  (registers the ltm_* models)
from tokenthrift import ltm
from tokenthrift.data.coco import CocoInstances, coco_metrics, make_collage, to_coco_results
from tokenthrift.detection import fasterrcnn, maskrcnn

SWIN = dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4)


def tiny_detector(**kw):
    torch.manual_seed(0)
    return maskrcnn("swin_tiny_patch4_window7_224", 11, backbone_kwargs=SWIN, head_width=32, min_size=64,
                    max_size=64, **kw).eval()


def test_ltm_backbone_at_ratio_one_gives_the_plain_detections_and_merged_maps_keep_the_strides():
    plain = tiny_detector()
    merged = ltm.convert(copy.deepcopy(plain), 1.0)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    with torch.no_grad():
        a, b = plain(images), merged(images)
    for x, y in zip(a, b):
        for key in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(x[key], y[key]), key
    # MACs on real images, as torchvision's detectors take them: a list of (C, H, W) images (was an AttributeError)
    from tokenthrift import measure
    assert measure.macs(plain, (3, 64, 64), example=images) == pytest.approx(
        (measure.macs(plain, (3, 64, 64), example=images[:1]) + measure.macs(plain, (3, 64, 48),
                                                                              example=images[1:])) / 2, rel=0.02)
    ltm.remove(merged)
    ltm.convert(merged, [1.0, 1.0, 0.5, 0.5, 0.5])  # merge in the last three stages
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        shapes = [m.shape for m in plain.backbone.features(x)]
        assert [m.shape for m in merged.backbone.features(x)] == shapes
        assert [s[-1] for s in shapes] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
        assert list(merged.backbone(x)) == ["0", "1", "2", "3", "pool"]


def test_plain_and_ltm_vit_backbones_get_a_simple_feature_pyramid():
    for name, kw in (("vit_tiny_patch16_224", dict(depth=2, patch_size=8)),
                     ("ltm_vit_small_patch16_224", dict(depth=2, patch_size=8, ltm_site_ratio=0.8))):
        model = fasterrcnn(name, 3, backbone_kwargs=kw, head_width=32, min_size=64, max_size=64).eval()
        assert model.backbone.strides == [2, 4, 8, 16]
        with torch.no_grad():
            maps = model.backbone.features(torch.rand(1, 3, 64, 64))
            assert [m.shape[-1] for m in maps] == [32, 16, 8, 4]
            assert model([torch.rand(3, 64, 64)])[0]["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="unknown timm backbone"):
        maskrcnn("swin_nonexistent", 11)
    with pytest.raises(ValueError, match="counts the background"):
        maskrcnn("swin_tiny_patch4_window7_224", 1)


def write_coco(root):
    """Two images: a polygon square, an RLE rectangle and a crowd region on one; nothing on the other."""
    import pycocotools.mask as mask_util
    from PIL import Image

    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for i in (1, 2):
        Image.new("RGB", (40, 30)).save(root / "val2017" / f"{i}.png")
    rect = np.zeros((30, 40), np.uint8)
    rect[5:15, 20:35] = 1
    rle = mask_util.encode(np.asfortranarray(rect))
    crowd = np.zeros((30, 40), np.uint8)
    crowd[18:28, 2:18] = 1
    crowd_rle = mask_util.encode(np.asfortranarray(crowd))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [2, 3, 10, 10], "area": 100, "iscrowd": 0,
         "segmentation": [[2, 3, 12, 3, 12, 13, 2, 13]]},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [20, 5, 15, 10], "area": 150, "iscrowd": 0,
         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [2, 18, 16, 10], "area": 160, "iscrowd": 1,
         "segmentation": {"size": crowd_rle["size"], "counts": crowd_rle["counts"].decode()}},
    ]
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.png", "height": 30, "width": 40} for i in (1, 2)],
        "annotations": anns, "categories": [{"id": 2, "name": "b"}, {"id": 5, "name": "e"}]}))
    (root / "annotations" / "instances_train2017.json").write_text(
        (root / "annotations" / "instances_val2017.json").read_text())


def test_coco_loader_polygons_rle_crowd_and_metrics(tmp_path):
    write_coco(tmp_path)
    evaluation = CocoInstances(tmp_path, "val")
    training = CocoInstances(tmp_path, "train", train=True)
    assert len(evaluation) == 2 and len(training) == 1  # the image without annotations: evaluation only
    image, target = evaluation[0]
    assert image.shape == (3, 30, 40) and target["labels"].tolist() == [2, 5]  # the crowd region is no target
    assert target["boxes"].tolist() == [[2, 3, 12, 13], [20, 5, 35, 15]]
    assert int(target["masks"][1].sum()) == 150 and target["masks"][1, 5:15, 20:35].all()
    assert 90 <= int(target["masks"][0].sum()) <= 121  # the polygon rasterised
    perfect = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.tensor([0.9, 0.8]),
               "masks": target["masks"][:, None].float()}
    empty = {k: v[:0] for k, v in perfect.items()}
    score = coco_metrics(evaluation.coco, to_coco_results([perfect, empty], [1, 2], True))
    assert score["box_AP"] == pytest.approx(100.0) and score["mask_AP"] == pytest.approx(100.0)
    on_crowd = {k: torch.cat([v, w]) for (k, v), w in zip(perfect.items(), (
        torch.tensor([[2.0, 18, 18, 28]]), torch.tensor([2]), torch.tensor([0.95]), torch.zeros(1, 1, 30, 40)))}
    crowd_score = coco_metrics(evaluation.coco, to_coco_results([on_crowd, empty], [1, 2], False), masks=False)
    assert crowd_score["box_AP"] == pytest.approx(100.0)  # a detection on a crowd region is ignored, as COCO does
    shifted = {**perfect, "boxes": perfect["boxes"] + 4, "masks": torch.roll(perfect["masks"], 4, -1)}
    worse = coco_metrics(evaluation.coco, to_coco_results([shifted, empty], [1, 2], True))
    assert worse["box_AP"] < 100.0 and worse["mask_AP"] < 100.0


def test_collage_is_written_in_coco_layout_and_read_back(tmp_path):
    import pycocotools.mask as mask_util

    summary = make_collage(tmp_path, train=6, val=4, size=64, seed=1, max_objects=4)
    assert summary["val"]["images"] == 4 and summary["train"]["instances"] >= 6
    ds = CocoInstances(tmp_path, "val")
    raw = json.loads(next((tmp_path / "annotations").glob("instances_val*.json")).read_text())
    first = [a for a in raw["annotations"] if a["image_id"] == ds.ids[0]]
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and len(target["labels"]) == len(first)
    for k, ann in enumerate(first):
        mask = mask_util.decode({**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()})
        assert torch.equal(target["masks"][k], torch.from_numpy(mask))
        ys, xs = np.nonzero(mask)  # the box is the visible mask's extent
        assert target["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert 1 <= min(target["labels"].tolist()) and max(target["labels"].tolist()) <= 10


def test_detection_from_the_command_line(tmp_path, capsys):
    from test_cli import parse_table

    from tokenthrift.apps.cli import main

    data = tmp_path / "collage"
    main(["make-collage", "--out", str(data), "--train", "16", "--val", "6", "--size", "64", "--max-objects", "3"])
    common = ["--task", "detection", "--model", "maskrcnn", "--backbone", "swin_tiny_patch4_window7_224",
              "--model-kwargs", "embed_dim=16", "depths=[1,1,2,1]", "num_heads=[1,2,2,4]", "window_size=4",
              "--det-head-width", "32", "--img-size", "64", "--data", f"coco:{data}", "--epochs", "1",
              "--batch-size", "4", "--eval-batch-size", "4", "--warmup-epochs", "0", "--no-progress", "--output",
              str(tmp_path)]
    main(["train", *common, "--name", "base", "--ema"])
    log = [json.loads(line) for line in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()][-1]
    for key in ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg", "box_AP",
                "mask_AP", "box_AP50", "box_AP_ema"):
        assert key in log, key
    import timm
    classifier = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **SWIN)
    torch.save(classifier.state_dict(), tmp_path / "classifier.pth")
    main(["train", *common, "--name", "ltm", "--method", "ltm", "--no-ltm-ib", "--ltm-site-ratio", "1", "0.5", "0.5",
          "0.5", "1", "--init-backbone", str(tmp_path / "classifier.pth")])  # merges in stages 2 and 3 (full windows)
    (tmp_path / "classifier.pth").unlink()  # the run's checkpoint holds the weights: eval does not need the file
    capsys.readouterr()
    main(["eval", "--checkpoint", str(tmp_path / "base" / "last.pth"), "--batch-size", "4"])
    row = parse_table(capsys.readouterr().out)[0]
    assert row["box_AP"] == pytest.approx(log["box_AP"], abs=0.01) and row["images"] == 6
    main(["eval", "--checkpoint", str(tmp_path / "ltm" / "last.pth"), "--batch-size", "4"])
    row = parse_table(capsys.readouterr().out)[0]
    assert row["MACs_ratio"] < 1 and row["backbone_GMACs"] < row["backbone_GMACs_without_method"]
    capsys.readouterr()  # a plain backbone with --method ltm takes the backbone's calibrated ratios
    main(["macs", "--task", "detection", "--model", "maskrcnn", "--backbone", "swin_tiny_patch4_window7_224",
          "--img-size", "224", "--det-head-width", "32", "--method", "ltm"])
    rows = parse_table(capsys.readouterr().out)  # at 224 px about the classifier's 0.844 (the FPN is not merged)
    assert rows[0]["backbone_ratio"] == 1 and 0.83 < rows[1]["backbone_ratio"] < 0.86
    assert rows[1]["detector_GMACs"] > rows[1]["backbone_GMACs"] and rows[1]["backbone_ratio"] < rows[1]["detector_ratio"] < 1
    png = tmp_path / "det.png"
    main(["visualize", "--checkpoint", str(tmp_path / "ltm" / "last.pth"), "--images", "2", "--out", str(png)])
    assert png.stat().st_size > 1000
    for extra, message in ((["--method", "toe"], "trains with --method full or ltm"),
                           (["--method", "ltm", "--ltm-site-ratio", "0.5"], "--no-ltm-ib"),
                           (["--mixup", "0.2"], "classification's")):
        with pytest.raises(SystemExit):
            main(["train", *common, "--name", "x", *extra])
        assert message in capsys.readouterr().err


def test_a_classifier_initialises_the_detector_backbone(tmp_path):
    """Classifier weights (plain timm names) reach the features_only backbone under its own names, for a
    hierarchical (Swin, LTM Swin) and a plain ViT backbone, read from a run's checkpoint, safetensors or a
    plain state dict; weights of another model or shape are refused with the reason."""
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    from tokenthrift.train import TrainConfig, build_model
    from tokenthrift.train.checkpoint import read_weights, stamp

    cases = (("swin_tiny_patch4_window7_224", SWIN, dict(strict_img_size=False)),
             ("ltm_swin_tiny_patch4_window7_224", dict(SWIN, ltm_site_ratio=0.5), dict(strict_img_size=False)),
             ("vit_tiny_patch16_224", dict(depth=2, patch_size=8), dict(img_size=64)))
    for name, kw, classifier_only in cases:
        classifier = timm.create_model(name, num_classes=10, **kw, **classifier_only).eval()
        weights = classifier.state_dict()
        det = maskrcnn(name, 11, backbone_kwargs=kw, head_width=32).eval()
        unused = tokenthrift.detection.load_backbone_weights(det, weights)
        assert unused and all(k.startswith(("head", "norm", "fc_norm")) for k in unused), unused
        got = det.backbone.body.state_dict()
        for key, value in weights.items():
            if key not in unused:
                match = [k for k in (key, f"model.{key}", key.replace(".", "_", 1)) if k in got][0]
                if key == "pos_embed":  # classified at 64 px (8x8 patches), detecting at the model's 224 (28x28)
                    value = resample_abs_pos_embed(value, [28, 28], (8, 8), num_prefix_tokens=1)
                assert torch.equal(got[match], value), key
        x = torch.rand(1, 3, 64, 64)
        if hasattr(classifier, "forward_intermediates") and name.startswith("swin"):
            with torch.no_grad():
                want = classifier.forward_intermediates(x, intermediates_only=True)
                assert all(torch.allclose(a, b) for a, b in zip(det.backbone.features(x), want))

    classifier = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **SWIN)
    torch.save({"model": classifier.state_dict(), "epoch": 3}, tmp_path / "other_script.pth")
    save_file(classifier.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(stamp({"config": {}, "model": classifier.state_dict(), "method": {}, "epoch": 1}), tmp_path / "run.pth")
    for file in ("other_script.pth", "w.safetensors", "run.pth"):
        assert read_weights(tmp_path / file).keys() == classifier.state_dict().keys()
        cfg = TrainConfig(task="detection", model="maskrcnn", backbone="swin_tiny_patch4_window7_224",
                          model_kwargs=dict(SWIN), det_head_width=32, img_size=64, data="coco:-",
                          num_classes=11, init_backbone=str(tmp_path / file))
        det = build_model(cfg)
        assert torch.equal(det.backbone.body.state_dict()["layers_2.blocks.1.mlp.fc1.weight"],
                           classifier.state_dict()["layers.2.blocks.1.mlp.fc1.weight"])

    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match="holds no model weights"):
        read_weights(tmp_path / "notes.txt")
    det = tiny_detector()
    with pytest.raises(ValueError, match="lack .* of the backbone's"):
        tokenthrift.detection.load_backbone_weights(det, timm.create_model("resnet18").state_dict())
    wider = timm.create_model("swin_tiny_patch4_window7_224", **{**SWIN, "embed_dim": 32}).state_dict()
    with pytest.raises(ValueError, match="has shape .* same --model-kwargs"):
        tokenthrift.detection.load_backbone_weights(det, wider)
    with pytest.raises(ValueError, match="--init-backbone applies to --task detection"):
        build_model(TrainConfig(model="vit_tiny_patch16_224", init_backbone=str(tmp_path / "run.pth")))
