from metis_hf.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
