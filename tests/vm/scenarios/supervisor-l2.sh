# L2: say so, then give the console a shell.
echo "L2 ready"
setsid cttyhack sh
