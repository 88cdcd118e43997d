from quadnet.train import main

main()
