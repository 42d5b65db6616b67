"""The test suite, mirroring the layers: shared/, training/<stage>/, serving/, cluster/."""
