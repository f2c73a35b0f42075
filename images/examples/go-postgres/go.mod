module example.com/todo

go 1.19

require github.com/lib/pq v1.10.7

// Debian's golang-github-lib-pq-dev (installed in the image) provides the driver's source, so
// nothing is downloaded: the image has no module proxy to reach.
replace github.com/lib/pq => /usr/share/gocode/src/github.com/lib/pq
