"""The ExtensionsIndex description file (SlicerEchoFM.json) passes the index's checks, run offline.

A port of the rules of the ExtensionsIndex's scripts/check_description_files.py and of Slicer's
catalog-entry schema (Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json): JSON schema,
category, repository name containing "Slicer", scm_url syntax, top-level CMakeLists.txt (project()
named like the description file, EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS set to http(s)
images), licence file at the root. Where the index downloads (the schema, the images, the
repository) the test reads this checkout instead: each raw.githubusercontent.com URL must name
this repository and revision and a PNG/JPEG/GIF file that exists here.
"""
from __future__ import annotations

import json
import os
import re
import urllib.parse as urlparse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCHEMA = {   # Slicer's slicer-extension-catalog-entry-schema-v1.0.2.json (without titles)
    "type": "object", "required": ["$schema", "category", "scm_url"], "additionalProperties": False,
    "properties": {
        "$schema": {"type": "string"}, "category": {"type": "string"}, "scm_url": {"type": "string"},
        "scm_revision": {"type": "string"}, "scm_type": {"type": "string", "enum": ["git", "local"]},
        "build_dependencies": {"type": "array", "items": {"type": "string"}},
        "dicom_support_rule": {"type": "string"}, "build_subdirectory": {"type": "string"},
        "enabled": {"type": "boolean"}, "tier": {"type": "integer", "minimum": 1, "maximum": 5}}}
SCHEMA_URL = re.compile(r"^https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v1\.0\.[0-9]+\.json#?$")
ACCEPTED_CATEGORIES = {
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda",
    "Converters", "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation",
    "Filtering", "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "IGT", "Informatics",
    "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning", "Otolaryngology",
    "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy", "Registration",
    "Remote", "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis", "Shape Regression",
    "Shape Visualization", "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging", "Supervisely",
    "Surface Models", "SurfaceLearner", "Tomographic Reconstruction", "Tracking", "Tractography", "Training",
    "Ultrasound", "Utilities", "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools", "Web System Tools",
    "Wizards"}
LICENSE_NAMES = ["LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt"]
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")
TYPES = {"string": str, "array": list, "boolean": bool, "object": dict}


class CheckError(AssertionError):
    """One failed index check, named like the index's check."""


def check_schema(meta: dict) -> None:
    if not isinstance(meta, dict):
        raise CheckError("check_json_schema: the description is not a JSON object")
    for key in SCHEMA["required"]:
        if key not in meta:
            raise CheckError(f"check_json_schema: '{key}' is a required property")
    for key, value in meta.items():
        spec = SCHEMA["properties"].get(key)
        if spec is None:
            raise CheckError(f"check_json_schema: additional property '{key}' is not allowed")
        kind = spec["type"]
        ok = (isinstance(value, int) and not isinstance(value, bool)) if kind == "integer" else isinstance(value, TYPES[kind])
        if not ok:
            raise CheckError(f"check_json_schema: {key}: {value!r} is not of type {kind}")
        if "enum" in spec and value not in spec["enum"]:
            raise CheckError(f"check_json_schema: {key}: {value!r} is not one of {spec['enum']}")
        if kind == "integer" and not spec["minimum"] <= value <= spec["maximum"]:
            raise CheckError(f"check_json_schema: {key}: {value} outside [{spec['minimum']}, {spec['maximum']}]")
        if kind == "array" and not all(isinstance(v, str) for v in value):
            raise CheckError(f"check_json_schema: {key}: items must be strings")
    if not SCHEMA_URL.match(meta["$schema"]):
        raise CheckError(f"check_json_schema: $schema {meta['$schema']!r} is not a Slicer catalog-entry schema")


def check_category(meta: dict) -> None:
    if meta["category"] not in ACCEPTED_CATEGORIES:
        raise CheckError(f"check_category: category {meta['category']!r} is unknown")


def repository_name(scm_url: str) -> str:
    return os.path.splitext(urlparse.urlsplit(scm_url).path.split("/")[-1])[0]


def check_git_repository_name(meta: dict) -> None:
    name = repository_name(meta["scm_url"])
    if "slicer" not in name.lower():
        raise CheckError(f"check_git_repository_name: extension repository name is {name!r}; "
                         f"consider changing it to 'Slicer{name}'")


def check_scm_url_syntax(meta: dict) -> None:
    url = meta["scm_url"]
    if "://" not in url:
        raise CheckError("check_scm_url_syntax: scm_url does not match scheme://host/path")
    scheme = urlparse.urlsplit(url).scheme
    if scheme not in ("git", "https"):
        raise CheckError(f"check_scm_url_syntax: scm_url scheme is {scheme!r}, not git or https")


def local_image(url: str, meta: dict, repo: Path, what: str) -> Path:
    """The file of this checkout that a raw.githubusercontent.com URL serves (offline validate_image_url)."""
    if not url.startswith("http"):
        raise CheckError(f"check_cmakelists_content: {what} {url!r} should be a URL starting with 'http'")
    parts = urlparse.urlsplit(url)
    owner_repo = "/".join(urlparse.urlsplit(meta["scm_url"]).path.strip("/").split("/")[:2])
    owner_repo = owner_repo[:-4] if owner_repo.endswith(".git") else owner_repo
    prefix = f"/{owner_repo}/{meta.get('scm_revision', 'main')}/"
    if parts.netloc != "raw.githubusercontent.com" or not parts.path.startswith(prefix):
        raise CheckError(f"check_cmakelists_content: {what} {url!r} is not a raw file of {owner_repo} "
                         f"at {meta.get('scm_revision', 'main')}")
    path = repo / parts.path[len(prefix):]
    if not path.is_file():
        raise CheckError(f"check_cmakelists_content: {what} {url!r}: {path.relative_to(repo)} does not exist")
    if not path.read_bytes().startswith(IMAGE_MAGIC):
        raise CheckError(f"check_cmakelists_content: {what} {url!r} does not point to a PNG, JPEG or GIF image")
    return path


def check_cmakelists_content(name: str, meta: dict, repo: Path) -> list:
    cmake = repo / "CMakeLists.txt"
    if not cmake.is_file():
        raise CheckError("check_cmakelists_content: CMakeLists.txt file not found in repository root")
    text = cmake.read_text(encoding="utf-8", errors="ignore")
    m = re.findall(r'project\s*\(\s*([^\s\)\n\r]+)', text, re.IGNORECASE | re.MULTILINE)
    project = m[0].strip().strip('"').strip("'") if m else None
    if project is None:
        raise CheckError("check_cmakelists_content: No project() declaration found in CMakeLists.txt")
    if project != name:
        raise CheckError(f"check_cmakelists_content: project name {project!r} does not match the extension "
                         f"description file name {name!r}")
    icons = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text, re.IGNORECASE | re.MULTILINE)
    if not icons:
        raise CheckError("check_cmakelists_content: No EXTENSION_ICONURL found in CMakeLists.txt.")
    images = [local_image(icons[0].strip(), meta, repo, "EXTENSION_ICONURL")]
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text, re.IGNORECASE | re.MULTILINE)
    urls = shots[0].split() if shots else []
    if not urls:
        raise CheckError("check_cmakelists_content: No EXTENSION_SCREENSHOTURLS found in CMakeLists.txt.")
    images += [local_image(u, meta, repo, "EXTENSION_SCREENSHOTURLS") for u in urls]
    return images


def check_license_file(repo: Path) -> Path:
    for n in LICENSE_NAMES:
        if (repo / n).is_file():
            return repo / n
    raise CheckError("check_license_file: No license file found in repository root.")


def check_all(description: Path, repo: Path = REPO) -> dict:
    """Every check of the index on one description file; returns what the checks found."""
    try:
        meta = json.loads(description.read_text())
    except json.JSONDecodeError as e:
        raise CheckError(f"Failed to parse {description.name}: {e}") from None
    name = description.stem
    check_schema(meta)
    check_category(meta)
    check_git_repository_name(meta)
    check_scm_url_syntax(meta)
    images = check_cmakelists_content(name, meta, repo)
    return {"meta": meta, "images": images, "license": check_license_file(repo)}


def descriptions() -> list:
    return sorted(p for p in REPO.glob("*.json"))


# ---------------------------------------------------------------------- the description passes
def test_there_is_one_description_named_after_the_cmake_project():
    text = (REPO / "CMakeLists.txt").read_text()
    project = re.search(r"project\(\s*(\w+)", text).group(1)
    assert [p.name for p in descriptions()] == [f"{project}.json"]


def test_the_description_passes_the_index_checks():
    found = check_all(descriptions()[0])
    assert len(found["images"]) >= 2                               # icon + at least one screenshot
    assert "Apache License" in found["license"].read_text() and "Version 2.0" in found["license"].read_text()


def test_the_description_agrees_with_the_cmake_metadata():
    meta = json.loads(descriptions()[0].read_text())
    text = (REPO / "CMakeLists.txt").read_text()
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', text).group(1).split()
    assert meta.get("build_dependencies", []) == ([] if depends == ["NA"] else depends)
    assert meta["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]*)"\)', text).group(1)
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]*)"\)', text).group(1)
    assert homepage.split("#")[0].rstrip("/") == meta["scm_url"].removesuffix(".git")
    assert 'Modality' in meta.get("dicom_support_rule", "")        # suggested for ultrasound DICOM


def test_the_screenshot_is_a_small_real_picture():
    from PIL import Image

    shot = check_all(descriptions()[0])["images"][1]
    assert shot.stat().st_size < 300_000
    with Image.open(shot) as im:
        import numpy as np

        grey = np.asarray(im.convert("L"))
        assert grey.shape[1] >= 640 and grey.shape[0] >= 360
        assert np.unique(grey).size > 50                            # an echo image, not a placeholder


# ---------------------------------------------------------------------- the checks can fail
@pytest.mark.parametrize("change, message", [
    ({"scm_url": "https://github.com/echofm-slicer/EchoFM.git"}, "check_git_repository_name"),
    ({"scm_url": "ssh://github.com/echofm-slicer/SlicerEchoFM.git"}, "check_scm_url_syntax"),
    ({"category": "Cardiology"}, "check_category"),
    ({"tier": 9}, "check_json_schema"),
    ({"homepage": "https://example.org"}, "check_json_schema"),
    ({"scm_revision": "release"}, "not a raw file"),
])
def test_the_ported_checks_reject_bad_descriptions(tmp_path, change, message):
    meta = json.loads(descriptions()[0].read_text())
    meta.update(change)
    bad = tmp_path / descriptions()[0].name
    bad.write_text(json.dumps(meta))
    with pytest.raises(CheckError, match=message):
        check_all(bad)


def test_the_ported_checks_reject_a_bad_checkout(tmp_path):
    """Wrong project() name, empty screenshot list, missing licence: each fails as in the index."""
    for rel in ("EchoFMSlicer/Resources/Icons/EchoFMSlicer.png", "Resources/Screenshots/EchoFM-A4C.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((REPO / rel).read_bytes())
    text = (REPO / "CMakeLists.txt").read_text()
    desc = descriptions()[0]
    (tmp_path / "CMakeLists.txt").write_text(text.replace("project(SlicerEchoFM)", "project(EchoFM)"))
    with pytest.raises(CheckError, match="does not match"):
        check_all(desc, tmp_path)
    (tmp_path / "CMakeLists.txt").write_text(re.sub(r'set\(EXTENSION_SCREENSHOTURLS "[^"]*"\)',
                                                    'set(EXTENSION_SCREENSHOTURLS "")', text))
    with pytest.raises(CheckError, match="No EXTENSION_SCREENSHOTURLS"):
        check_all(desc, tmp_path)
    (tmp_path / "CMakeLists.txt").write_text(text)
    with pytest.raises(CheckError, match="No license file"):
        check_all(desc, tmp_path)
    (tmp_path / "LICENSE").write_text("Apache License Version 2.0")
    assert check_all(desc, tmp_path)["license"].name == "LICENSE"
