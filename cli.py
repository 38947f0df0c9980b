#!/usr/bin/env python
"""Run the shiftlab command line from a checkout: python cli.py heatmap --model vgg16"""
from shiftlab.launch import main

if __name__ == "__main__":
    main()
