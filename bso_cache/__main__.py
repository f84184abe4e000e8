"""`python -m bso_cache ...` (also under torchrun) runs the same CLI as `bso-cache`."""

from bso_cache.cli.app import main

if __name__ == "__main__":
    main()
