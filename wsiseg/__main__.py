from wsiseg.cli import main

main()
