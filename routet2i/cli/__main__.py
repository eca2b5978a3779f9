from routet2i.cli import main

main()
