from perfkit.cli import main

main()
