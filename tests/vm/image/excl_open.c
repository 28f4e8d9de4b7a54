/*
 * dboot-excl-open DEVICE: open a block device with O_EXCL and say whether that worked.
 *
 * On a block device, O_EXCL asks the kernel for an exclusive claim: it fails with EBUSY while the
 * device is mounted anywhere (in any mount namespace, lazily detached mounts included) or held
 * by another exclusive opener. Success proves the old root disk is truly free to repartition,
 * which /proc/mounts alone cannot show. busybox has no way to pass O_EXCL, hence this helper.
 * Exit: 0 claimed, 1 refused (errno named) or not a block device, 2 usage.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s BLOCK-DEVICE\n", argv[0]);
		return 2;
	}
	int fd = open(argv[1], O_RDONLY | O_EXCL | O_CLOEXEC);
	if (fd < 0) {
		printf("%s: exclusive open refused: %s (errno %d)\n", argv[1], strerror(errno), errno);
		return 1;
	}
	/* O_EXCL without O_CREAT means "exclusive claim" only for block devices. */
	struct stat st;
	if (fstat(fd, &st) != 0 || !S_ISBLK(st.st_mode)) {
		printf("%s: not a block device\n", argv[1]);
		return 1;
	}
	printf("%s: opened exclusively\n", argv[1]);
	close(fd);
	return 0;
}
