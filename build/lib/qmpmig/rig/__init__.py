"""qmpmig's own test rig: QEMU processes of the test guest (:mod:`.vm`),
device processes (:mod:`.processes`), a source and destination pair of
them (:mod:`.pair`), and ``qmpmig migrate --launch`` (:mod:`.launch`).
Nothing in the product imports from here."""
