from fxopt.cli import main

main()
