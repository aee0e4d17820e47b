"""Put timm's own tests/test_models.py, from the sdist of the installed timm version, beside this folder's
conftest in ``DEST`` (pip downloads the sdist; nothing of timm is kept in the repository)."""
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm


def main(dest: str) -> None:
    out = Path(dest)
    wanted = out / "test_models.py"
    stamp = out / ".timm-version"
    if wanted.exists() and stamp.exists() and stamp.read_text() == timm.__version__:
        return
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"timm=={timm.__version__}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("timm-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/tests/test_models.py"))
            with tar.extractfile(member) as src, open(wanted, "wb") as dst:
                shutil.copyfileobj(src, dst)
    shutil.copy(Path(__file__).with_name("conftest.py"), out / "conftest.py")
    stamp.write_text(timm.__version__)
    print(f"timm {timm.__version__}: tests/test_models.py -> {wanted}")


if __name__ == "__main__":
    main(sys.argv[1])
