from spigot.cli import main

main()
